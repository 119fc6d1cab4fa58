//! The memory counters the benchmarks read from `/proc`: the process's own
//! (`/proc/self/status`) and the whole system's (`/proc/meminfo`). All in KiB,
//! as the kernel prints them.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Reads `Key:   123 kB` lines into a lookup function.
fn parse_kib(text: &str) -> impl Fn(&str) -> Option<u64> + '_ {
    move |key: &str| {
        text.lines().find_map(|line| {
            let (k, v) = line.split_once(':')?;
            (k == key).then(|| v.split_whitespace().next()?.parse().ok())?
        })
    }
}

/// The calling process's memory (`/proc/self/status`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessMem {
    /// Resident anonymous memory: heap, thread stacks (and, for the bare
    /// runner, guest RAM).
    pub rss_anon_kib: u64,
    /// Resident file-backed memory (binary, libraries, mapped device pages).
    pub rss_file_kib: u64,
    /// Resident shared memory: the monitor's guest RAM (memfd pool pages).
    pub rss_shmem_kib: u64,
    /// Page tables of the process (`VmPTE`).
    pub pte_kib: u64,
    pub threads: u64,
    /// Bytes the allocator has handed out and not got back, in all arenas
    /// (glibc `mallinfo2`: `uordblks + hblkhd`), KiB; 0 without glibc.
    /// Unlike `RssAnon` it does not depend on freed memory being reused.
    pub heap_in_use_kib: u64,
}

impl ProcessMem {
    pub fn read() -> Result<ProcessMem> {
        let text =
            std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
        let get = parse_kib(&text);
        let need = |k: &str| get(k).with_context(|| format!("/proc/self/status has no {k}"));
        Ok(ProcessMem {
            rss_anon_kib: need("RssAnon")?,
            rss_file_kib: need("RssFile")?,
            rss_shmem_kib: need("RssShmem")?,
            pte_kib: need("VmPTE")?,
            threads: text
                .lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse().ok())
                .context("/proc/self/status has no Threads")?,
            heap_in_use_kib: heap_in_use() / 1024,
        })
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn heap_in_use() -> u64 {
    // SAFETY: mallinfo2 has no preconditions.
    let m = unsafe { libc::mallinfo2() };
    (m.uordblks + m.hblkhd) as u64
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn heap_in_use() -> u64 {
    0
}

/// Gives the allocator's free memory back to the kernel (glibc
/// `malloc_trim(0)`), so that memory freed earlier in the process is not
/// silently reused by the next measurement and left out of its `RssAnon`
/// growth. A no-op without glibc.
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// System-wide memory (`/proc/meminfo`). Other processes change these too.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MemInfo {
    pub mem_total_kib: u64,
    pub mem_available_kib: u64,
    /// Unreclaimable slab (kernel objects such as KVM's vCPU and MMU
    /// structures); the reclaimable part (dentries, inodes) is left out as it
    /// follows other processes' file activity.
    pub slab_unreclaimable_kib: u64,
    pub kernel_stack_kib: u64,
    /// Page tables of all processes.
    pub page_tables_kib: u64,
    /// Secondary page tables (KVM's guest-physical mappings), where the
    /// kernel reports them (0 when it does not).
    pub sec_page_tables_kib: u64,
    pub vmalloc_used_kib: u64,
    pub percpu_kib: u64,
    /// Shared memory of all processes (includes memfd pages).
    pub shmem_kib: u64,
}

impl MemInfo {
    pub fn read() -> Result<MemInfo> {
        let text = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
        let get = parse_kib(&text);
        let need = |k: &str| get(k).with_context(|| format!("/proc/meminfo has no {k}"));
        Ok(MemInfo {
            mem_total_kib: need("MemTotal")?,
            mem_available_kib: need("MemAvailable")?,
            slab_unreclaimable_kib: need("SUnreclaim")?,
            kernel_stack_kib: need("KernelStack")?,
            page_tables_kib: need("PageTables")?,
            sec_page_tables_kib: get("SecPageTables").unwrap_or(0),
            vmalloc_used_kib: get("VmallocUsed").unwrap_or(0),
            percpu_kib: get("Percpu").unwrap_or(0),
            shmem_kib: need("Shmem")?,
        })
    }

    /// The kernel memory counters that grow with KVM VMs and vCPU threads:
    /// unreclaimable slab, kernel stacks, page tables, secondary page
    /// tables, vmalloc and per-CPU allocations.
    pub fn kernel_kib(&self) -> u64 {
        self.slab_unreclaimable_kib
            + self.kernel_stack_kib
            + self.page_tables_kib
            + self.sec_page_tables_kib
            + self.vmalloc_used_kib
            + self.percpu_kib
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process_and_the_system() {
        let p = ProcessMem::read().unwrap();
        assert!(p.rss_anon_kib > 0 && p.threads >= 1);
        // The count is process-wide and other tests run beside this one,
        // allocating and freeing: a large block and half its size as the
        // bound keep their churn from deciding the outcome.
        let before = ProcessMem::read().unwrap().heap_in_use_kib;
        let block = std::hint::black_box(vec![1u8; 64 << 20]);
        let during = ProcessMem::read().unwrap().heap_in_use_kib;
        drop(block);
        assert!(during >= before + (32 << 10), "{before} -> {during} KiB");
        release_free_heap();
        let m = MemInfo::read().unwrap();
        assert!(m.mem_total_kib > 0 && m.mem_available_kib > 0);
        assert!(m.kernel_kib() > 0);
    }

    #[test]
    fn parses_kib_lines() {
        let get = parse_kib("MemTotal:  100 kB\nSlab:     7 kB\n");
        assert_eq!(get("Slab"), Some(7));
        assert_eq!(get("Mem"), None);
    }
}
