//! Guest code of the micro-guests, assembled at run time with iced-x86's code
//! assembler for 64-bit mode, loaded at [`CODE_ADDR`] and entered there by
//! every vCPU at CPL 3.
//!
//! Every program follows the same frame:
//! 1. WHOAMI hypercall (`in eax, dx`): the vCPU's index, which locates its
//!    parameter block (see `super::layout`);
//! 2. vCPU 0 logs a start line (LOG hypercall);
//! 3. the work, storing its progress counter into the parameter block every
//!    page or every 512 steps: a plain store, no exit;
//! 4. DONE hypercall (`out dx, al`) with the result in `rdi`.
//!
//! Hypercalls are port I/O because it is the cheapest exit that works at
//! CPL 3 (with IOPL 3) and carries no state the guest must set up; each one
//! costs an exit to user space, so the hot loops make none.
//!
//! Register use in the work: `r15` vCPU index, `r14` parameter block, `rbx`
//! progress counter, `r8` checksum, `r10`/`r11` LCG multiplier/increment.
//! The algorithms are those of `super::model`, which uses the same constants.
//!
//! A program is assembled for one workload, so values the parameter block
//! has no room for are immediates: the log line's name, and the private seed
//! and shared percentage of a fill that splits its pages between two seeds.

use iced_x86::code_asm::*;
use iced_x86::IcedError;

use super::layout::{
    field, CODE_ADDR, PARAMS_ADDR, PARAMS_SIZE, SYNC_BARRIER, SYNC_TABLE_READY, UNMAPPED_ADDR,
    WORDS_PER_PAGE,
};
use super::model::{FOLD_ROTATE, GOLDEN, LCG_A, LCG_C, NONZERO, STREAM_K};
use super::Workload;
use crate::vm::hypercall::{DONE_PORT, LOG_PORT, WHOAMI_PORT};

/// The port the `bad_io` test workload writes to; the monitor knows no device
/// there.
pub const BAD_IO_PORT: u16 = 0x0bad;

/// Progress is stored when the counter is a multiple of this mask + 1.
const PROGRESS_MASK: i32 = 511;

/// Assembles the program of `workload`, to be loaded and entered at
/// [`CODE_ADDR`].
pub fn assemble(workload: &Workload) -> Result<Vec<u8>, IcedError> {
    let split = match *workload {
        Workload::Fill {
            seed,
            private_seed,
            shared_percent,
            shared_run,
        } if shared_percent < 100 && private_seed != seed => Some(Split {
            private_seed,
            shared_percent,
            run_shift: shared_run.max(1).trailing_zeros(),
        }),
        _ => None,
    };
    let mut g = Gen {
        a: CodeAssembler::new(64)?,
        fill: None,
        split,
    };
    g.prologue(workload.name())?;
    // Test workloads end in `ud2` instead of DONE: they must never complete.
    let completes = match *workload {
        Workload::Fill { .. } => {
            g.fill_private()?;
            true
        }
        Workload::Sweep { .. } => {
            g.fill_private()?;
            g.sweep()?;
            true
        }
        Workload::Random { .. } => {
            g.fill_private()?;
            g.random()?;
            true
        }
        Workload::TableScan { write_after, .. } => {
            g.table_scan(write_after)?;
            true
        }
        Workload::Counters { .. } => {
            g.counters()?;
            true
        }
        Workload::Crash => {
            g.a.mov(rax, UNMAPPED_ADDR)?;
            g.a.mov(rax, qword_ptr(rax))?;
            false
        }
        Workload::Spin => {
            let mut l = g.a.create_label();
            g.a.set_label(&mut l)?;
            g.a.jmp(l)?;
            false
        }
        Workload::BadIo => {
            g.a.mov(edx, BAD_IO_PORT as u32)?;
            g.a.out(dx, al)?;
            false
        }
    };
    if completes {
        g.done()?;
    }
    // The monitor never resumes a vCPU after DONE or a failed exit; if it
    // did, `ud2` would make that fail loudly.
    g.a.ud2()?;
    g.subroutines()?;
    g.a.assemble(CODE_ADDR)
}

/// The assembler plus the labels of subroutines emitted after the main code.
struct Gen {
    a: CodeAssembler,
    /// Set when the main code calls the fill subroutine.
    fill: Option<CodeLabel>,
    /// How the fill subroutine splits pages between the seed in `rsi` and a
    /// private seed; `None` writes every page from `rsi` (today's fill, and
    /// the only fill of sweeps, random touches and table scans).
    split: Option<Split>,
}

/// A fill's per-page seed choice, `super::model::fill_seed`.
#[derive(Clone, Copy)]
struct Split {
    private_seed: u64,
    /// Below 100.
    shared_percent: u8,
    /// log2 of the fill's `shared_run`.
    run_shift: u32,
}

impl Gen {
    /// WHOAMI, parameter block, start line from vCPU 0, zeroed counters.
    fn prologue(&mut self, name: &str) -> Result<(), IcedError> {
        let a = &mut self.a;
        a.mov(edx, WHOAMI_PORT as u32)?;
        a.in_(eax, dx)?;
        a.mov(r15d, eax)?;
        a.imul_3(r14, r15, PARAMS_SIZE as i32)?;
        a.add(r14, PARAMS_ADDR as i32)?;

        let mut skip = a.create_label();
        let mut msg = a.create_label();
        let text = format!("{name}: vCPU 0 started");
        a.test(r15, r15)?;
        a.jnz(skip)?;
        a.lea(rdi, ptr(msg))?;
        a.mov(esi, text.len() as u32)?;
        a.mov(edx, LOG_PORT as u32)?;
        a.out(dx, al)?;
        a.jmp(skip)?;
        a.set_label(&mut msg)?;
        a.db(text.as_bytes())?;
        a.set_label(&mut skip)?;

        a.xor(ebx, ebx)?;
        a.xor(r8d, r8d)?;
        Ok(())
    }

    /// DONE with the checksum.
    fn done(&mut self) -> Result<(), IcedError> {
        let a = &mut self.a;
        a.mov(rdi, r8)?;
        a.mov(edx, DONE_PORT as u32)?;
        a.out(dx, al)
    }

    /// Calls the fill subroutine: `rdi` first page, `rcx` pages, `rsi` seed.
    fn call_fill(&mut self) -> Result<(), IcedError> {
        let label = *self.fill.get_or_insert_with(|| self.a.create_label());
        self.a.call(label)
    }

    /// Fills the private slice.
    fn fill_private(&mut self) -> Result<(), IcedError> {
        let a = &mut self.a;
        a.mov(rdi, qword_ptr(r14 + field::BASE))?;
        a.mov(rcx, qword_ptr(r14 + field::WORDS))?;
        a.shr(rcx, 9)?;
        a.mov(rsi, qword_ptr(r14 + field::SEED))?;
        self.call_fill()
    }

    /// `r10`, `r11` = LCG multiplier and increment.
    fn load_lcg(&mut self) -> Result<(), IcedError> {
        self.a.mov(r10, LCG_A)?;
        self.a.mov(r11, LCG_C)
    }

    /// `r13` = the vCPU's stream seed, `seed ^ (index + 1) * STREAM_K`.
    fn load_stream(&mut self) -> Result<(), IcedError> {
        let a = &mut self.a;
        a.lea(r13, qword_ptr(r15 + 1))?;
        a.mov(rax, STREAM_K)?;
        a.imul_2(r13, rax)?;
        a.xor(r13, qword_ptr(r14 + field::SEED))
    }

    /// `r13` = next stream state; `rax` = the word index it picks in
    /// `0..rcx` (`rcx` < 2^32).
    fn next_pick(&mut self) -> Result<(), IcedError> {
        let a = &mut self.a;
        a.imul_2(r13, r10)?;
        a.add(r13, r11)?;
        a.mov(rax, r13)?;
        a.shr(rax, 32)?;
        a.imul_2(rax, rcx)?;
        a.shr(rax, 32)
    }

    /// `r8 = rol(r8) ^ value`.
    fn fold(&mut self, value: AsmRegister64) -> Result<(), IcedError> {
        self.a.rol(r8, FOLD_ROTATE)?;
        self.a.xor(r8, value)
    }

    /// Counts one step in `rbx`, storing it every 512 steps.
    fn step_progress(&mut self) -> Result<(), IcedError> {
        let a = &mut self.a;
        let mut skip = a.create_label();
        a.inc(rbx)?;
        a.test(ebx, PROGRESS_MASK)?;
        a.jnz(skip)?;
        a.mov(qword_ptr(r14 + field::PROGRESS), rbx)?;
        a.set_label(&mut skip)
    }

    /// Stores the progress counter.
    fn store_progress(&mut self) -> Result<(), IcedError> {
        self.a.mov(qword_ptr(r14 + field::PROGRESS), rbx)
    }

    /// `passes` sweeps over the private slice: every word `v` becomes
    /// `v * LCG_A + LCG_C`; progress counts pages.
    fn sweep(&mut self) -> Result<(), IcedError> {
        self.load_lcg()?;
        let a = &mut self.a;
        let mut end = a.create_label();
        let mut pass = a.create_label();
        let mut word = a.create_label();
        a.mov(r12, qword_ptr(r14 + field::ITERATIONS))?;
        a.test(r12, r12)?;
        a.jz(end)?;
        a.set_label(&mut pass)?;
        a.mov(rdi, qword_ptr(r14 + field::BASE))?;
        a.mov(rcx, qword_ptr(r14 + field::WORDS))?;
        a.set_label(&mut word)?;
        a.mov(rax, qword_ptr(rdi))?;
        a.imul_2(rax, r10)?;
        a.add(rax, r11)?;
        a.mov(qword_ptr(rdi), rax)?;
        a.rol(r8, FOLD_ROTATE)?;
        a.xor(r8, rax)?;
        a.add(rdi, 8)?;
        a.dec(rcx)?;
        a.test(ecx, WORDS_PER_PAGE as i32 - 1)?; // page boundary
        a.jnz(word)?;
        a.inc(rbx)?;
        a.mov(qword_ptr(r14 + field::PROGRESS), rbx)?;
        a.test(rcx, rcx)?;
        a.jnz(word)?;
        a.dec(r12)?;
        a.jnz(pass)?;
        a.set_label(&mut end)
    }

    /// `touches` read-modify-writes `v = rol(v, 1) ^ s` of words the stream
    /// picks in the private slice.
    fn random(&mut self) -> Result<(), IcedError> {
        self.load_lcg()?;
        self.load_stream()?;
        let mut end = self.a.create_label();
        let mut touch = self.a.create_label();
        let a = &mut self.a;
        a.mov(r12, qword_ptr(r14 + field::ITERATIONS))?;
        a.test(r12, r12)?;
        a.jz(end)?;
        a.mov(rdi, qword_ptr(r14 + field::BASE))?;
        a.mov(rcx, qword_ptr(r14 + field::WORDS))?;
        a.set_label(&mut touch)?;
        self.next_pick()?;
        let a = &mut self.a;
        a.lea(rdx, qword_ptr(rdi + rax * 8))?;
        a.mov(rax, qword_ptr(rdx))?;
        a.rol(rax, 1)?;
        a.xor(rax, r13)?;
        a.mov(qword_ptr(rdx), rax)?;
        self.fold(rax)?;
        self.step_progress()?;
        self.a.dec(r12)?;
        self.a.jnz(touch)?;
        self.a.set_label(&mut end)?;
        self.store_progress()
    }

    /// vCPU 0 fills the shared table and raises the ready flag; the others
    /// spin until it is up. Then every vCPU folds `lookups` words the stream
    /// picks in the table (the result covers the lookups only), with vCPU 0
    /// adding GOLDEN to every table word after `write_after` of them when that is not 0.
    fn table_scan(&mut self, write_after: u64) -> Result<(), IcedError> {
        let mut wait = self.a.create_label();
        let mut go = self.a.create_label();
        let a = &mut self.a;
        a.test(r15, r15)?;
        a.jnz(wait)?;
        a.mov(rdi, qword_ptr(r14 + field::SHARED_BASE))?;
        a.mov(rcx, qword_ptr(r14 + field::SHARED_WORDS))?;
        a.shr(rcx, 9)?;
        a.mov(rsi, qword_ptr(r14 + field::SEED))?;
        self.call_fill()?;
        // x86 stores are not reordered with older stores: the table is
        // visible before the flag.
        let a = &mut self.a;
        a.mov(rax, SYNC_TABLE_READY)?;
        a.mov(qword_ptr(rax), 1)?;
        a.jmp(go)?;
        a.set_label(&mut wait)?;
        a.mov(rax, SYNC_TABLE_READY)?;
        let mut spin = a.create_label();
        a.set_label(&mut spin)?;
        a.pause()?;
        a.cmp(qword_ptr(rax), 0)?;
        a.je(spin)?;
        a.set_label(&mut go)?;

        a.xor(r8d, r8d)?;
        self.load_lcg()?;
        self.load_stream()?;
        if write_after == 0 {
            self.a.mov(r12, qword_ptr(r14 + field::ITERATIONS))?;
            self.lookups()?;
        } else {
            // A reader that turns writer (config keeps `write_after` within
            // `lookups`): lookups, barrier, vCPU 0 adds GOLDEN to every table word,
            // barrier, the rest of the lookups.
            self.a.mov(r12, write_after)?;
            self.lookups()?;
            self.store_progress()?;
            self.barrier(1)?;
            let mut written = self.a.create_label();
            let mut word = self.a.create_label();
            let a = &mut self.a;
            a.test(r15, r15)?;
            a.jnz(written)?;
            a.mov(rdi, qword_ptr(r14 + field::SHARED_BASE))?;
            a.mov(rcx, qword_ptr(r14 + field::SHARED_WORDS))?;
            a.mov(rdx, GOLDEN)?;
            a.set_label(&mut word)?;
            a.add(qword_ptr(rdi), rdx)?;
            a.add(rdi, 8)?;
            a.dec(rcx)?;
            a.jnz(word)?;
            a.set_label(&mut written)?;
            self.barrier(2)?;
            let a = &mut self.a;
            a.mov(r12, qword_ptr(r14 + field::ITERATIONS))?;
            a.mov(rax, write_after)?;
            a.sub(r12, rax)?;
            self.lookups()?;
        }
        self.store_progress()
    }

    /// `r12` lookups (none when 0) of the table: each picks a word with the
    /// stream and folds it into `r8`. Clobbers rax, rcx, rdi, r12.
    fn lookups(&mut self) -> Result<(), IcedError> {
        let mut end = self.a.create_label();
        let mut lookup = self.a.create_label();
        let a = &mut self.a;
        a.test(r12, r12)?;
        a.jz(end)?;
        a.mov(rdi, qword_ptr(r14 + field::SHARED_BASE))?;
        a.mov(rcx, qword_ptr(r14 + field::SHARED_WORDS))?;
        a.set_label(&mut lookup)?;
        self.next_pick()?;
        self.a.mov(rax, qword_ptr(rdi + rax * 8))?;
        self.fold(rax)?;
        self.step_progress()?;
        self.a.dec(r12)?;
        self.a.jnz(lookup)?;
        self.a.set_label(&mut end)
    }

    /// The `round`-th meeting of all vCPUs on [`SYNC_BARRIER`] (which counts
    /// arrivals and is never reset: round k waits for k x NVCPUS). Clobbers
    /// rax, rdx.
    fn barrier(&mut self, round: u64) -> Result<(), IcedError> {
        let a = &mut self.a;
        let mut wait = a.create_label();
        let mut done = a.create_label();
        a.mov(rax, SYNC_BARRIER)?;
        a.lock().inc(qword_ptr(rax))?;
        a.mov(rdx, qword_ptr(r14 + field::NVCPUS))?;
        a.imul_3(rdx, rdx, round as i32)?;
        a.set_label(&mut wait)?;
        a.cmp(qword_ptr(rax), rdx)?;
        a.jae(done)?;
        a.pause()?;
        a.jmp(wait)?;
        a.set_label(&mut done)
    }

    /// `increments` locked increments walking the counters (one per 64-byte
    /// line) round-robin from counter `index % counters`; a barrier on a
    /// locked counter; then the fold of all counters, the same on every vCPU.
    fn counters(&mut self) -> Result<(), IcedError> {
        let a = &mut self.a;
        let mut barrier = a.create_label();
        let mut inc = a.create_label();
        let mut no_wrap = a.create_label();
        // rsi = first counter, rcx = counters, rdx = own first, r9 = end.
        a.mov(rsi, qword_ptr(r14 + field::SHARED_BASE))?;
        a.mov(rcx, qword_ptr(r14 + field::SHARED_WORDS))?;
        a.shr(rcx, 3)?;
        a.mov(rax, r15)?;
        a.xor(edx, edx)?;
        a.div(rcx)?;
        a.shl(rdx, 6)?;
        a.add(rdx, rsi)?;
        a.mov(r9, rcx)?;
        a.shl(r9, 6)?;
        a.add(r9, rsi)?;
        a.mov(r12, qword_ptr(r14 + field::ITERATIONS))?;
        a.test(r12, r12)?;
        a.jz(barrier)?;
        a.set_label(&mut inc)?;
        a.lock().inc(qword_ptr(rdx))?;
        a.add(rdx, 64)?;
        a.cmp(rdx, r9)?;
        a.jb(no_wrap)?;
        a.mov(rdx, rsi)?;
        a.set_label(&mut no_wrap)?;
        self.step_progress()?;
        self.a.dec(r12)?;
        self.a.jnz(inc)?;
        self.a.set_label(&mut barrier)?;
        self.store_progress()?;

        let a = &mut self.a;
        let mut wait = a.create_label();
        let mut sum = a.create_label();
        a.mov(rax, SYNC_BARRIER)?;
        a.lock().inc(qword_ptr(rax))?;
        a.mov(r10, qword_ptr(r14 + field::NVCPUS))?;
        a.set_label(&mut wait)?;
        a.cmp(qword_ptr(rax), r10)?;
        a.jae(sum)?;
        a.pause()?;
        a.jmp(wait)?;
        a.set_label(&mut sum)?;
        a.xor(r8d, r8d)?;
        a.mov(rdx, rsi)?;
        let mut fold = a.create_label();
        a.set_label(&mut fold)?;
        a.rol(r8, FOLD_ROTATE)?;
        a.xor(r8, qword_ptr(rdx))?;
        a.add(rdx, 64)?;
        a.cmp(rdx, r9)?;
        a.jb(fold)
    }

    /// Emits the subroutines the main code called.
    fn subroutines(&mut self) -> Result<(), IcedError> {
        let Some(mut fill) = self.fill else {
            return Ok(());
        };
        // fill: rdi = first page, rcx = pages, rsi = seed. Writes
        // `super::model::page_content` into each page (of `rsi`, or with a
        // split of `model::fill_seed`), folds every word into r8 and counts
        // pages in rbx. Clobbers rax, rdx, r9, rdi, rcx.
        let split = self.split;
        let a = &mut self.a;
        let mut ret = a.create_label();
        let mut page = a.create_label();
        let mut nonzero = a.create_label();
        let mut word = a.create_label();
        a.set_label(&mut fill)?;
        a.test(rcx, rcx)?;
        a.jz(ret)?;
        a.set_label(&mut page)?;
        a.mov(rax, rdi)?;
        a.shr(rax, 12)?;
        a.mov(r9, GOLDEN)?;
        a.imul_2(rax, r9)?;
        if let Some(split) = split {
            // r9 = page_is_shared_in_runs(gfn) ? rsi : private seed, where
            // that is `pick((gfn >> run_shift) * GOLDEN, 100) < shared_percent`.
            if split.run_shift == 0 {
                a.mov(rdx, rax)?;
            } else {
                a.mov(rdx, rdi)?;
                a.shr(rdx, 12 + split.run_shift)?;
                a.imul_2(rdx, r9)?;
            }
            a.shr(rdx, 32)?;
            a.imul_3(rdx, rdx, 100)?;
            a.shr(rdx, 32)?;
            a.mov(r9, split.private_seed)?;
            a.cmp(edx, split.shared_percent as i32)?;
            a.cmovb(r9, rsi)?;
            a.xor(rax, r9)?;
        } else {
            a.xor(rax, rsi)?;
        }
        a.jnz(nonzero)?;
        a.mov(rax, NONZERO)?;
        a.set_label(&mut nonzero)?;
        a.mov(edx, 512)?;
        a.set_label(&mut word)?;
        for (shift_left, n) in [(true, 13), (false, 7), (true, 17)] {
            a.mov(r9, rax)?;
            if shift_left {
                a.shl(r9, n)?;
            } else {
                a.shr(r9, n)?;
            }
            a.xor(rax, r9)?;
        }
        a.mov(qword_ptr(rdi), rax)?;
        a.rol(r8, FOLD_ROTATE)?;
        a.xor(r8, rax)?;
        a.add(rdi, 8)?;
        a.dec(edx)?;
        a.jnz(word)?;
        a.inc(rbx)?;
        a.mov(qword_ptr(r14 + field::PROGRESS), rbx)?;
        a.dec(rcx)?;
        a.jnz(page)?;
        a.set_label(&mut ret)?;
        a.ret()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::layout::CODE_MAX;

    #[test]
    fn every_program_assembles_and_fits() {
        let all = [
            Workload::Fill {
                seed: 1,
                private_seed: 1,
                shared_percent: 100,
                shared_run: 1,
            },
            Workload::Fill {
                seed: 1,
                private_seed: 2,
                shared_percent: 50,
                shared_run: 1,
            },
            Workload::Sweep { seed: 1, passes: 2 },
            Workload::Random {
                seed: 1,
                touches: 9,
            },
            Workload::TableScan {
                seed: 1,
                table_pages: 2,
                lookups: 5,
                write_after: 0,
            },
            Workload::TableScan {
                seed: 1,
                table_pages: 2,
                lookups: 5,
                write_after: 3,
            },
            Workload::Counters {
                counters: 3,
                increments: 4,
            },
            Workload::Crash,
            Workload::Spin,
            Workload::BadIo,
        ];
        for w in &all {
            let code = assemble(w).unwrap();
            assert!(
                !code.is_empty() && code.len() as u64 <= CODE_MAX,
                "{}",
                w.name()
            );
        }
    }

    #[test]
    fn fill_code_splits_only_when_the_private_seed_can_show() {
        let fill = |private_seed, shared_percent| {
            assemble(&Workload::Fill {
                seed: 7,
                private_seed,
                shared_percent,
                shared_run: 1,
            })
            .unwrap()
        };
        // 100 % (or one seed) is today's program, whatever the private seed.
        assert_eq!(fill(9, 100), fill(7, 100));
        assert_eq!(fill(7, 30), fill(7, 100));
        assert_ne!(fill(9, 30), fill(7, 100));
    }
}
