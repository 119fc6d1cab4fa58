//! VM density: create, start and wait for a batch of micro-VMs (1 vCPU,
//! 4 MiB, a short fill) added to a `Monitor`, then remove them (joined,
//! guest memory freed). Throughput is in VMs, so criterion prints VMs per
//! second. One `Monitor` serves every iteration, as one monitor process
//! would. Every guest's checksum is checked (a wrong one panics).
//!
//! `disco bench density` measures create and start separately, plus the
//! memory per VM, and reports tables and JSON.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};

use disco::bench::config_from_doc;
use disco::bench::density::{run_batch, DensityOptions};
use disco::monitor::Monitor;

fn density(c: &mut Criterion) {
    if !disco::kvm_check::require_kvm("benches/density") {
        return;
    }
    let mut group = c.benchmark_group("density/create-start-wait");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(10));
    for vms in [10, 100] {
        let options = DensityOptions {
            vms,
            memory_mib: 4,
            ..DensityOptions::standard(false)
        };
        let config = config_from_doc(options.config()).expect("valid config");
        let mut monitor =
            Monitor::for_config(&config, Duration::from_millis(500)).expect("a monitor");
        group.throughput(Throughput::Elements(vms as u64));
        group.bench_function(format!("{vms}-vms-4MiB-fill"), |b| {
            b.iter(|| {
                run_batch(&mut monitor, &config)
                    .unwrap_or_else(|e| panic!("batch of {vms} VMs: {e:#}"))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, density);
criterion_main!(benches);
