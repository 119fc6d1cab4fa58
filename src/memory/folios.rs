//! Large shmem folios for guest RAM: the host's side of it.
//!
//! Guest RAM lives in the pools' memfds (shmem). The first touch of a
//! shmem page costs more than that of an anonymous page (a page-cache
//! insert and shmem's own accounting on top of the allocation), and with
//! 4 KiB folios every page pays it. Linux 6.11 and later can give shmem
//! multi-size folios (16 kB to 2 MiB, "mTHP"): one fault allocates a whole
//! folio, and the guest's touches of its other pages only map what is
//! already there. Measured on this project's hosts: writing 256 MiB of a
//! fresh memfd took 158 ms with 4 KiB folios and 22 ms with 64 kB ones.
//!
//! Which sizes shmem may use is the host's choice, one sysfs file per size
//! (`/sys/kernel/mm/transparent_hugepage/hugepages-<N>kB/shmem_enabled`,
//! `never` on a stock kernel). The monitor never changes it: it only asks
//! (`MADV_HUGEPAGE` on guest mappings, see `mapper::map_pool_run`), which
//! takes effect for the sizes set to `advise`, and says in the run report
//! what the host allows. [`KnobGuard`] sets a size for a while and puts
//! the old value back; the overhead bench and the tests use it.
//!
//! Merging, moving or releasing one page of a large folio punches that
//! page out of the pool: the kernel splits the folio and only that page
//! goes back to the host. A guest that touches one page of a folio holds
//! the whole folio in host memory, the usual price of large pages.
//!
//! Page sampling works with large folios: where guest RAM asks for them,
//! only the pages zapped for a sample are registered for minor faults,
//! until their touch (`Memory::zap_frames`). Were the whole guest range in
//! minor mode, a large folio's first touch would map only the touched page
//! and every other page of it would fault to the monitor's handler.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

const THP: &str = "/sys/kernel/mm/transparent_hugepage";

/// The shmem folio sizes (kB) larger than a page that a mapping asking
/// for large folios may get on this host, smallest first: those whose
/// `shmem_enabled` is `always`, `within_size` or `advise`, or `inherit`
/// with the global `shmem_enabled` at one of those. Empty on a kernel
/// without them.
pub fn host_sizes_kib() -> Vec<u32> {
    sizes_under(Path::new(THP))
}

/// The value a sysfs choice file has selected: the word in brackets
/// (`always [madvise] never` -> `madvise`).
pub fn selected(text: &str) -> Option<&str> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))
}

/// Folio sizes for messages: `16, 64 kB`, or `none`.
pub fn sizes_text(kib: &[u32]) -> String {
    match kib {
        [] => "none".into(),
        _ => {
            let list: Vec<String> = kib.iter().map(u32::to_string).collect();
            format!("{} kB", list.join(", "))
        }
    }
}

fn sizes_under(root: &Path) -> Vec<u32> {
    let setting = |path: PathBuf| -> Option<String> {
        selected(&std::fs::read_to_string(path).ok()?).map(str::to_string)
    };
    let allows = |s: &str| matches!(s, "always" | "within_size" | "advise" | "force");
    let global = setting(root.join("shmem_enabled")).unwrap_or_default();
    let Ok(dir) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut sizes: Vec<u32> = dir
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let kib: u32 = name
                .strip_prefix("hugepages-")?
                .strip_suffix("kB")?
                .parse()
                .ok()?;
            let s = setting(root.join(&name).join("shmem_enabled"))?;
            (allows(&s) || (s == "inherit" && allows(&global))).then_some(kib)
        })
        .collect();
    sizes.sort_unstable();
    sizes
}

/// How many large shmem folios of `kib` the host has allocated since boot
/// (`stats/shmem_alloc` of that size), if the kernel counts them.
pub fn shmem_allocs(kib: u32) -> Option<u64> {
    let path = Path::new(THP).join(format!("hugepages-{kib}kB/stats/shmem_alloc"));
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Sets the host's `shmem_enabled` for one folio size and restores the
/// old value when dropped (also on a panic that unwinds).
pub struct KnobGuard {
    path: PathBuf,
    old: String,
}

impl KnobGuard {
    /// Sets folio size `kib` to `value` (`advise`, `never`, ...). Needs
    /// root and a kernel with multi-size shmem folios.
    pub fn set(kib: u32, value: &str) -> Result<KnobGuard> {
        let path = Path::new(THP).join(format!("hugepages-{kib}kB/shmem_enabled"));
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "{}: this kernel has no {kib} kB shmem folios (Linux 6.11 or later has them)",
                path.display()
            )
        })?;
        let old = selected(&text)
            .with_context(|| format!("{}: no chosen value in {text:?}", path.display()))?
            .to_string();
        std::fs::write(&path, value)
            .with_context(|| format!("setting {} to {value} (needs root)", path.display()))?;
        Ok(KnobGuard { path, old })
    }
}

impl Drop for KnobGuard {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(&self.path, &self.old) {
            eprintln!(
                "disco: could not restore {} to {}: {e}",
                self.path.display(),
                self.old
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_each_setting_and_the_global_one() {
        let root = std::env::temp_dir().join(format!("disco-folios-{}", std::process::id()));
        let knob = |dir: &str, value: &str| {
            let d = root.join(dir);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("shmem_enabled"), value).unwrap();
        };
        knob("", "always within_size advise [never] deny force\n");
        knob(
            "hugepages-64kB",
            "always inherit within_size [advise] never\n",
        );
        knob(
            "hugepages-16kB",
            "always inherit within_size advise [never]\n",
        );
        knob(
            "hugepages-2048kB",
            "always [inherit] within_size advise never\n",
        );
        knob(
            "hugepages-32kB",
            "[always] inherit within_size advise never\n",
        );
        assert_eq!(sizes_under(&root), vec![32, 64]);
        knob("", "always within_size [advise] never deny force\n");
        assert_eq!(
            sizes_under(&root),
            vec![32, 64, 2048],
            "inherit follows the global"
        );
        assert!(sizes_under(&root.join("absent")).is_empty());
        assert_eq!(selected("always [madvise] never\n"), Some("madvise"));
        assert_eq!(selected("no choice"), None);
        assert_eq!(sizes_text(&[16, 64]), "16, 64 kB");
        assert_eq!(sizes_text(&[]), "none");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
