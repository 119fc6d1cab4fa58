//! Access traces: a line-oriented text file of access samples, grouped by
//! policy epoch, that can be replayed as a [`CounterSource`] (deterministic
//! tests, experiments repeated exactly) and recorded from any other source
//! ([`TraceWriter`], [`Recorder`]).
//!
//! ## Format (version 1)
//! ```text
//! # disco access trace, format 1        <- comment: '#' to the end of the line
//! nodes 4                               <- optional, once, before any epoch:
//!                                          samples must name nodes 0..3
//! epoch 0                               <- the samples of policy epoch 0 follow
//! 3 0x1a2 2 r 5                         <- vm 3, guest frame 0x1a2, from node 2,
//!                                          read, by vCPU 5
//! 3 1a3 2 w                             <- a write; vCPU defaults to 0
//! epoch 2                               <- epoch 1 had no samples
//! ```
//! - A sample line is `<vm> <gfn> <node> <r|w> [vcpu]`: `vm` is a decimal
//!   32-bit number, `gfn` the guest frame number in hexadecimal (with or
//!   without `0x`), `node` the decimal NUMA node of the accessing vCPU, `r`
//!   or `w` the kind of access, `vcpu` the decimal vCPU index (default 0).
//! - Fields are separated by spaces or tabs; blank lines are ignored.
//! - `epoch <n>` lines are strictly increasing decimal numbers; an epoch
//!   that does not appear had no samples. Samples before the first `epoch`
//!   line are an error.
//!
//! Replaying yields one epoch per [`CounterSource::poll`]: the first poll
//! returns epoch 0, the next epoch 1, and so on; after the last epoch a poll
//! returns nothing.
//!
//! Every parse error names the file and line: `run.trace:12: ...`.

use std::fmt;
use std::io::{self, Write};
use std::path::Path;

use super::counters::{AccessSample, CounterSource};

/// A parse error: file, line (1-based; 0 when the file could not be read)
/// and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

impl fmt::Display for TraceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}:{}: {}", self.file, self.line, self.message)
        }
    }
}

impl std::error::Error for TraceError {}

/// The samples of one epoch.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct TraceEpoch {
    pub number: u64,
    pub samples: Vec<AccessSample>,
}

/// A parsed trace: the epochs that appear in the file, in increasing order.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Trace {
    /// The `nodes` line, when the file has one.
    pub nodes: Option<usize>,
    pub epochs: Vec<TraceEpoch>,
}

/// Largest trace file read (about 10 M samples).
pub const MAX_TRACE_BYTES: u64 = 256 << 20;

/// Upper bound for `nodes` (and so for node numbers).
pub const MAX_TRACE_NODES: usize = 4096;

impl Trace {
    /// Reads and parses a trace file; errors name the file and line.
    pub fn load(path: &Path) -> Result<Trace, TraceError> {
        let file = path.display().to_string();
        let text = crate::files::read_text(path, MAX_TRACE_BYTES).map_err(|e| TraceError {
            file: file.clone(),
            line: 0,
            message: format!("trace file {e}"),
        })?;
        Trace::parse(&text, &file)
    }

    /// Parses trace text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Trace, TraceError> {
        let mut trace = Trace::default();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let err = |message: String| TraceError {
                file: file.to_string(),
                line,
                message,
            };
            let content = raw.split('#').next().unwrap_or("");
            let fields: Vec<&str> = content.split_whitespace().collect();
            match fields.first() {
                None => continue,
                Some(&"nodes") => {
                    if fields.len() != 2 {
                        return Err(err("expected `nodes <count>` (one decimal number)".into()));
                    }
                    if trace.nodes.is_some() {
                        return Err(err("a second `nodes` line; give it once".into()));
                    }
                    if !trace.epochs.is_empty() {
                        return Err(err("`nodes` must come before the first `epoch` line".into()));
                    }
                    let n = parse_dec(fields[1], "node count").map_err(&err)?;
                    if n == 0 || n > MAX_TRACE_NODES as u64 {
                        return Err(err(format!(
                            "node count {n} is out of range; allowed: 1 to {MAX_TRACE_NODES}"
                        )));
                    }
                    trace.nodes = Some(n as usize);
                }
                Some(&"epoch") => {
                    if fields.len() != 2 {
                        return Err(err("expected `epoch <number>` (one decimal number)".into()));
                    }
                    let n = parse_dec(fields[1], "epoch number").map_err(&err)?;
                    if let Some(last) = trace.epochs.last() {
                        if n <= last.number {
                            return Err(err(format!(
                                "epoch {n} after epoch {}; epoch numbers must increase",
                                last.number
                            )));
                        }
                    }
                    trace.epochs.push(TraceEpoch {
                        number: n,
                        samples: Vec::new(),
                    });
                }
                Some(_) => {
                    let sample = parse_sample(&fields, trace.nodes).map_err(&err)?;
                    match trace.epochs.last_mut() {
                        Some(e) => e.samples.push(sample),
                        None => {
                            return Err(err(
                                "a sample before the first `epoch <number>` line".into()
                            ))
                        }
                    }
                }
            }
        }
        Ok(trace)
    }

    /// The trace as text in the format above (what [`TraceWriter`] writes).
    pub fn to_text(&self) -> String {
        let mut out = Vec::new();
        self.write_to(&mut out)
            .expect("writing to a Vec cannot fail");
        String::from_utf8(out).expect("the trace format is ASCII")
    }

    pub fn write_to<W: Write>(&self, out: W) -> io::Result<()> {
        let mut w = TraceWriter::new(out, self.nodes)?;
        for e in &self.epochs {
            w.epoch(e.number, &e.samples)?;
        }
        w.finish().map(|_| ())
    }

    pub fn sample_count(&self) -> usize {
        self.epochs.iter().map(|e| e.samples.len()).sum()
    }

    /// Number of epochs a replay takes (last epoch number + 1).
    pub fn epoch_count(&self) -> u64 {
        self.epochs.last().map_or(0, |e| e.number + 1)
    }

    /// Highest node any sample names.
    pub fn max_node(&self) -> Option<usize> {
        self.epochs
            .iter()
            .flat_map(|e| e.samples.iter().map(|s| s.node))
            .max()
    }
}

fn parse_dec(s: &str, what: &str) -> Result<u64, String> {
    s.parse::<u64>()
        .map_err(|_| format!("`{s}` is not a valid {what} (a decimal number)"))
}

fn parse_sample(fields: &[&str], nodes: Option<usize>) -> Result<AccessSample, String> {
    if fields.len() < 4 || fields.len() > 5 {
        return Err(format!(
            "expected `<vm> <gfn-hex> <node> r|w [vcpu]`, `epoch <n>` or `nodes <n>`; \
             found {} field{}",
            fields.len(),
            if fields.len() == 1 { "" } else { "s" }
        ));
    }
    let vm = fields[0].parse::<u32>().map_err(|_| {
        format!(
            "`{}` is not a valid VM id (a decimal number up to {})",
            fields[0],
            u32::MAX
        )
    })?;
    let hex = fields[1]
        .strip_prefix("0x")
        .or_else(|| fields[1].strip_prefix("0X"))
        .unwrap_or(fields[1]);
    let gfn = u64::from_str_radix(hex, 16)
        .ok()
        .filter(|_| !hex.is_empty() && !hex.starts_with('+'))
        .ok_or_else(|| {
            format!(
                "`{}` is not a valid guest frame number (hexadecimal, e.g. 0x1a2)",
                fields[1]
            )
        })?;
    let node = parse_dec(fields[2], "node")? as usize;
    let limit = nodes.unwrap_or(MAX_TRACE_NODES);
    if node >= limit {
        return Err(match nodes {
            Some(n) => format!(
                "node {node} is out of range; the trace declares `nodes {n}` (0 to {})",
                n - 1
            ),
            None => format!(
                "node {node} is out of range; allowed: 0 to {}",
                MAX_TRACE_NODES - 1
            ),
        });
    }
    let write = match fields[3] {
        "r" => false,
        "w" => true,
        other => {
            return Err(format!(
                "`{other}` is not an access kind; allowed: r (read) or w (write)"
            ))
        }
    };
    let vcpu = match fields.get(4) {
        Some(v) => parse_dec(v, "vCPU index")? as usize,
        None => 0,
    };
    Ok(AccessSample {
        vm,
        gfn,
        node,
        write,
        vcpu,
    })
}

/// Writes a trace in the format above, epoch by epoch.
pub struct TraceWriter<W: Write> {
    out: W,
    nodes: Option<usize>,
    /// Lowest epoch number the next epoch may have.
    next_epoch: u64,
}

impl<W: Write> TraceWriter<W> {
    /// Writes the header (a comment describing the format, and `nodes` when
    /// given).
    pub fn new(mut out: W, nodes: Option<usize>) -> io::Result<TraceWriter<W>> {
        writeln!(out, "# disco access trace, format 1")?;
        writeln!(out, "# epoch <n> | <vm> <gfn-hex> <node> r|w [vcpu]")?;
        if let Some(n) = nodes {
            writeln!(out, "nodes {n}")?;
        }
        Ok(TraceWriter {
            out,
            nodes,
            next_epoch: 0,
        })
    }

    /// Writes the next epoch (numbered one after the previous one).
    pub fn write_epoch(&mut self, samples: &[AccessSample]) -> io::Result<()> {
        self.epoch(self.next_epoch, samples)
    }

    /// Writes epoch `number`, which must be above every epoch written so far.
    pub fn epoch(&mut self, number: u64, samples: &[AccessSample]) -> io::Result<()> {
        if number < self.next_epoch {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "epoch {number} written after epoch {}; epoch numbers must increase",
                    self.next_epoch - 1
                ),
            ));
        }
        if let Some(bad) = samples
            .iter()
            .find(|s| s.node >= self.nodes.unwrap_or(MAX_TRACE_NODES))
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("sample {bad:?} names a node outside the trace's node range"),
            ));
        }
        writeln!(self.out, "epoch {number}")?;
        for s in samples {
            writeln!(
                self.out,
                "{} {:#x} {} {} {}",
                s.vm,
                s.gfn,
                s.node,
                if s.write { 'w' } else { 'r' },
                s.vcpu
            )?;
        }
        self.next_epoch = number + 1;
        Ok(())
    }

    /// Flushes and hands back the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Replays a trace, one epoch per poll.
pub struct TraceSource {
    file: String,
    trace: Trace,
    /// Epoch the next poll returns.
    next_epoch: u64,
    /// Index in `trace.epochs` of the next epoch present in the file.
    index: usize,
}

impl TraceSource {
    pub fn open(path: &Path) -> Result<TraceSource, TraceError> {
        Ok(TraceSource::new(
            &path.display().to_string(),
            Trace::load(path)?,
        ))
    }

    /// A source over an already parsed trace; `file` names it in
    /// [`CounterSource::describe`].
    pub fn new(file: &str, trace: Trace) -> TraceSource {
        TraceSource {
            file: file.to_string(),
            trace,
            next_epoch: 0,
            index: 0,
        }
    }

    /// Checks the trace against the topology it is replayed on.
    pub fn check_nodes(&self, nodes: usize) -> Result<(), TraceError> {
        let err = |message: String| TraceError {
            file: self.file.clone(),
            line: 0,
            message,
        };
        if let Some(n) = self.trace.nodes {
            if n != nodes {
                return Err(err(format!(
                    "the trace was recorded on {n} nodes but the topology has {nodes}"
                )));
            }
        }
        match self.trace.max_node() {
            Some(m) if m >= nodes => Err(err(format!(
                "the trace names node {m} but the topology has {nodes} nodes (0 to {})",
                nodes - 1
            ))),
            _ => Ok(()),
        }
    }

    /// True once every epoch of the trace has been polled.
    pub fn finished(&self) -> bool {
        self.index >= self.trace.epochs.len()
    }

    pub fn trace(&self) -> &Trace {
        &self.trace
    }
}

impl CounterSource for TraceSource {
    fn name(&self) -> &str {
        "trace"
    }

    fn describe(&self) -> String {
        format!(
            "replayed trace {} ({} epochs, {} samples)",
            self.file,
            self.trace.epoch_count(),
            self.trace.sample_count()
        )
    }

    fn poll(&mut self, out: &mut Vec<AccessSample>) -> anyhow::Result<()> {
        if let Some(e) = self.trace.epochs.get(self.index) {
            if e.number == self.next_epoch {
                out.extend_from_slice(&e.samples);
                self.index += 1;
            }
        }
        self.next_epoch += 1;
        Ok(())
    }
}

/// Wraps a source and records every batch it yields as one trace epoch.
pub struct Recorder<S: CounterSource, W: Write + Send> {
    inner: S,
    writer: TraceWriter<W>,
}

impl<S: CounterSource, W: Write + Send> Recorder<S, W> {
    pub fn new(inner: S, out: W, nodes: Option<usize>) -> io::Result<Recorder<S, W>> {
        Ok(Recorder {
            inner,
            writer: TraceWriter::new(out, nodes)?,
        })
    }

    /// Flushes the trace and returns the source and the writer.
    pub fn finish(self) -> io::Result<(S, W)> {
        Ok((self.inner, self.writer.finish()?))
    }
}

impl<S: CounterSource, W: Write + Send> CounterSource for Recorder<S, W> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn describe(&self) -> String {
        format!("{} (recorded to a trace)", self.inner.describe())
    }

    fn poll(&mut self, out: &mut Vec<AccessSample>) -> anyhow::Result<()> {
        let start = out.len();
        self.inner.poll(out)?;
        self.writer.write_epoch(&out[start..])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn err_of(text: &str) -> String {
        Trace::parse(text, "t.trace").unwrap_err().to_string()
    }

    #[test]
    fn parses_the_documented_example() {
        let t = Trace::parse(
            "# disco access trace, format 1\nnodes 4\nepoch 0\n3 0x1a2 2 r 5\n3 1a3 2 w\n\nepoch 2 # later\n",
            "t",
        )
        .unwrap();
        assert_eq!(t.nodes, Some(4));
        assert_eq!(t.epochs.len(), 2);
        assert_eq!(
            t.epochs[0].samples,
            vec![
                AccessSample {
                    vm: 3,
                    gfn: 0x1a2,
                    node: 2,
                    write: false,
                    vcpu: 5
                },
                AccessSample::write(3, 0x1a3, 2),
            ]
        );
        assert_eq!(t.epochs[1].number, 2);
        assert_eq!(t.epoch_count(), 3);
        assert_eq!(t.sample_count(), 2);
    }

    #[test]
    fn errors_name_file_and_line() {
        assert_eq!(
            err_of("epoch 0\n1 0x10 0 x\n"),
            "t.trace:2: `x` is not an access kind; allowed: r (read) or w (write)"
        );
        assert!(err_of("1 0x10 0 r\n").starts_with("t.trace:1: a sample before"));
        assert!(err_of("epoch 1\nepoch 1\n").starts_with("t.trace:2: epoch 1 after epoch 1"));
        assert!(err_of("nodes 2\nepoch 0\n0 0 2 r\n").contains("t.trace:3: node 2 is out of range"));
        assert!(
            err_of("epoch 0\n0 zz 0 r\n").contains("t.trace:2: `zz` is not a valid guest frame")
        );
        assert!(err_of("epoch 0\n0 0x 0 r\n").contains("`0x` is not a valid guest frame"));
        assert!(err_of("epoch 0\n-1 0 0 r\n").contains("not a valid VM id"));
        assert!(err_of("epoch 0\n0 0 0 r 1 2\n").contains("found 6 fields"));
        assert!(err_of("epoch x\n").contains("t.trace:1: `x` is not a valid epoch number"));
        assert!(err_of("epoch 0\nnodes 2\n").contains("before the first `epoch`"));
        assert!(err_of("nodes 0\n").contains("allowed: 1 to"));
        assert!(err_of("nodes 2\nnodes 2\n").contains("second `nodes`"));
    }

    #[test]
    fn missing_file_names_it() {
        let e = Trace::load(Path::new("/nonexistent/x.trace")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/nonexistent/x.trace: trace file cannot be opened"),
            "{e}"
        );
    }

    #[test]
    fn source_yields_epochs_in_order_with_gaps() {
        let t = Trace::parse("epoch 1\n0 1 0 r\nepoch 3\n0 2 1 w\n", "t").unwrap();
        let mut s = TraceSource::new("t", t);
        let mut polls = Vec::new();
        for _ in 0..5 {
            let mut out = Vec::new();
            s.poll(&mut out).unwrap();
            polls.push(out.len());
        }
        assert_eq!(polls, vec![0, 1, 0, 1, 0]);
        assert!(s.finished());
        assert!(
            s.describe().contains("4 epochs, 2 samples"),
            "{}",
            s.describe()
        );
        assert!(s.check_nodes(2).is_ok());
        assert!(s.check_nodes(1).unwrap_err().to_string().contains("node 1"));
    }

    #[test]
    fn recorder_writes_what_it_passes_on() {
        let inner = crate::numa::counters::ReplaySource::new(
            "mem",
            vec![
                vec![AccessSample::read(1, 0xabc, 1)],
                vec![],
                vec![AccessSample::write(2, 5, 0)],
            ],
        );
        let mut r = Recorder::new(inner, Vec::new(), Some(2)).unwrap();
        let mut all = Vec::new();
        for _ in 0..3 {
            r.poll(&mut all).unwrap();
        }
        let (_, bytes) = r.finish().unwrap();
        let t = Trace::parse(std::str::from_utf8(&bytes).unwrap(), "rec").unwrap();
        assert_eq!(t.nodes, Some(2));
        assert_eq!(t.epochs.len(), 3);
        let replayed: Vec<AccessSample> = t.epochs.into_iter().flat_map(|e| e.samples).collect();
        assert_eq!(replayed, all);
    }

    #[test]
    fn writer_refuses_decreasing_epochs() {
        let mut w = TraceWriter::new(Vec::new(), None).unwrap();
        w.epoch(3, &[]).unwrap();
        assert!(w.epoch(3, &[]).is_err());
        assert!(w.write_epoch(&[]).is_ok());
    }

    fn arb_trace() -> impl Strategy<Value = Trace> {
        let sample = (
            any::<u32>(),
            any::<u64>(),
            0usize..8,
            any::<bool>(),
            0usize..64,
        )
            .prop_map(|(vm, gfn, node, write, vcpu)| AccessSample {
                vm,
                gfn,
                node,
                write,
                vcpu,
            });
        (
            proptest::option::of(8usize..16),
            proptest::collection::vec((1u64..4, proptest::collection::vec(sample, 0..6)), 0..6),
        )
            .prop_map(|(nodes, raw)| {
                let mut number = 0;
                let epochs = raw
                    .into_iter()
                    .map(|(gap, samples)| {
                        number += gap;
                        TraceEpoch { number, samples }
                    })
                    .collect();
                Trace { nodes, epochs }
            })
    }

    proptest! {
        #[test]
        fn write_then_parse_is_identity(t in arb_trace()) {
            let text = t.to_text();
            prop_assert_eq!(Trace::parse(&text, "p").unwrap(), t);
        }
    }
}
