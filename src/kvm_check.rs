//! Tests that need `/dev/kvm` call [`require_kvm`]: without KVM they fail with
//! a clear message, unless `DISCO_ALLOW_NO_KVM=1` is set, in which case they are
//! skipped loudly (never passed silently).

/// Returns `true` when KVM is usable. Panics with a clear message when it is
/// not and `DISCO_ALLOW_NO_KVM=1` is not set; returns `false` (after printing
/// a loud SKIP line) when it is not and the variable is set.
pub fn require_kvm(test: &str) -> bool {
    match kvm_ioctls::Kvm::new() {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("DISCO_ALLOW_NO_KVM").as_deref() == Ok("1") {
                eprintln!("SKIP {test}: /dev/kvm is not usable ({e}); skipped because DISCO_ALLOW_NO_KVM=1");
                false
            } else {
                panic!(
                    "{test} needs a working /dev/kvm, which failed to open: {e}. \
                     Run on a host with KVM (as root or in group kvm), or set \
                     DISCO_ALLOW_NO_KVM=1 to skip KVM tests explicitly."
                );
            }
        }
    }
}
