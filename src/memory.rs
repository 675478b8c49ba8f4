//! Stage 6, the buffer plan: where each buffer of a lowered [`Program`] lives while an
//! entry point runs, and how many examples one run of it may take within a memory budget.
//!
//! A session runs one entry point at a time, in one arena of `f32`s. For each entry, this
//! stage computes every buffer's lifetime over the entry's launches and packs the buffers
//! into the arena so that buffers whose lifetimes overlap never share memory, and buffers
//! whose lifetimes do not may (first-fit by decreasing size, 64-byte aligned).
//!
//! Lifetimes, in launch order: a buffer the session binds before the run (parameters,
//! inputs, labels, the clip norm) lives from the start; a buffer the session reads after
//! the run (losses, norms, gradients, sums, the network's output) lives to the end; every
//! other buffer lives from the first to the last launch that binds it, where a launch of a
//! chunk group counts as the whole group (its launches run interleaved, chunk after chunk,
//! so a buffer one of them binds must survive them all). This relies on the
//! lowering invariant that within an entry a buffer's first writer overwrites it, never
//! reading what an earlier run or another buffer left there; the session poisons the arena
//! in debug builds so that a violation shows up as NaN in the numeric tests.
//!
//! [`micro_batch`] is the largest number of examples per run whose arena fits a budget:
//! a session cuts a larger batch into runs of that size (`runtime`).

use crate::graph::{Graph, Op};
use crate::lower::{BufId, EntryKind, LaunchMode, Program, Role};

/// Offsets are multiples of this many `f32`s (64 bytes): the arena starts on a cache line,
/// so every buffer does.
const ALIGN: u64 = pdgc_codegen::buffer::ALIGN_FLOATS as u64;

/// One entry point's arena layout for runs of `batch` examples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub kind: EntryKind,
    /// Examples per run.
    pub batch: u64,
    /// Per program buffer: its element offset in the arena, `None` if the entry does not
    /// use it.
    pub offsets: Vec<Option<u64>>,
    /// Elements of the arena.
    pub len: u64,
}

impl Layout {
    /// Bytes of the arena.
    pub fn bytes(&self) -> u64 {
        self.len * 4
    }
}

/// Whether the session reads `role` after running `kind` (so it lives to the end).
fn is_result(kind: EntryKind, role: &Role) -> bool {
    match role {
        Role::Loss => true,
        Role::BatchGrad(_) => kind == EntryKind::BatchGrad,
        Role::PerExampleGrad(_) => kind == EntryKind::PerExampleGrads,
        Role::Norms => matches!(kind, EntryKind::PerExampleNorms | EntryKind::ClippedSum),
        Role::ClippedSum(_) => kind == EntryKind::ClippedSum,
        _ => false,
    }
}

/// Whether the session writes `role` before a run.
pub fn is_bound(role: &Role) -> bool {
    matches!(role, Role::Param(_) | Role::Input(_) | Role::Label | Role::ClipNorm)
}

/// The layout of entry `kind` for runs of `batch` examples. `keep` are further buffers the
/// session reads after the run (the network's output for `forward`).
pub fn layout(program: &Program, kind: EntryKind, batch: u64, keep: &[BufId]) -> Layout {
    let entry = program.entry(kind);
    let n = program.buffers.len();
    // Lifetimes in half-steps: launch i is at 2i + 1; binding is at 0, reading at the end.
    let end = 2 * entry.launches.len() as u64 + 2;
    // A chunk group's launches run interleaved, chunk after chunk: every buffer one of
    // them binds is live over the whole group.
    let span = |i: usize| -> (u64, u64) {
        let t = |i: usize| 2 * i as u64 + 1;
        let mode = entry.launches[i].mode;
        if !matches!(mode, LaunchMode::Chunked { .. }) {
            return (t(i), t(i));
        }
        let first = (0..=i).rev().take_while(|&j| entry.launches[j].mode == mode).last().unwrap_or(i);
        let last = (i..entry.launches.len()).take_while(|&j| entry.launches[j].mode == mode).last().unwrap_or(i);
        (t(first), t(last))
    };
    let mut live: Vec<Option<(u64, u64)>> = vec![None; n];
    for (i, launch) in entry.launches.iter().enumerate() {
        let (first, last) = span(i);
        for id in &launch.args {
            let slot = &mut live[id.0 as usize];
            *slot = Some(match *slot {
                None => (first, last),
                Some((a, _)) => (a, last),
            });
        }
    }
    for (i, decl) in program.buffers.iter().enumerate() {
        if let Some((a, b)) = live[i] {
            let start = if is_bound(&decl.role) { 0 } else { a };
            let stop = if is_result(kind, &decl.role) || keep.contains(&BufId(i as u32)) { end } else { b };
            live[i] = Some((start, stop));
        }
    }
    // First fit by decreasing size: each buffer goes to the lowest aligned offset where it
    // overlaps no placed buffer whose lifetime overlaps its own.
    let mut order: Vec<usize> = (0..n).filter(|&i| live[i].is_some()).collect();
    let size = |i: usize| program.buffers[i].len(batch).div_ceil(ALIGN) * ALIGN;
    order.sort_by_key(|&i| (std::cmp::Reverse(size(i)), i));
    let mut offsets: Vec<Option<u64>> = vec![None; n];
    let mut placed: Vec<(u64, u64, (u64, u64))> = Vec::new(); // (offset, size, lifetime)
    let mut len = 0;
    for i in order {
        let (a, b) = live[i].expect("filtered");
        let s = size(i);
        let mut clashes: Vec<(u64, u64)> = placed
            .iter()
            .filter(|(_, ps, (pa, pb))| *ps > 0 && *pa <= b && a <= *pb)
            .map(|(po, ps, _)| (*po, po + ps))
            .collect();
        clashes.sort();
        let mut offset = 0;
        for (lo, hi) in clashes {
            if offset + s <= lo {
                break;
            }
            offset = offset.max(hi);
        }
        offsets[i] = Some(offset);
        placed.push((offset, s, (a, b)));
        len = len.max(offset + s);
    }
    Layout { kind, batch, offsets, len }
}

/// The buffer of the network's output (which a session's `forward` reads after a run), as
/// the `keep` argument of [`layout`].
pub fn output(graph: &Graph, program: &Program) -> Vec<BufId> {
    let out = graph.loss.input();
    let role = match &graph.node(out).op {
        Op::Input { name } => Role::Input(name.clone()),
        _ => Role::Activation(out.0),
    };
    program.find(&role).into_iter().collect()
}

/// Each entry's arena in bytes for runs of `batch` examples: the host memory a session
/// holds for its buffers while running that entry.
pub fn planned(graph: &Graph, program: &Program, batch: u64) -> Vec<(EntryKind, u64)> {
    let keep = output(graph, program);
    EntryKind::ALL.iter().map(|&k| (k, layout(program, k, batch, &keep).bytes())).collect()
}

/// The host memory a step of `kind` on `batch` examples, run in micro-batches of `micro`,
/// holds outside its arena, in bytes: the parameters the caller binds (the session copies
/// them into the arena, so a process holds them twice) and the results the session reads
/// out (per-example results for the whole batch; sums once, or twice while micro-batches
/// are added into a running total). With the arena, this is what the step adds to a
/// process that holds nothing else large.
pub fn outside(program: &Program, kind: EntryKind, batch: u64, micro: u64) -> u64 {
    let runs = batch.div_ceil(micro.max(1));
    let elements: u64 = program
        .buffers
        .iter()
        .map(|b| match &b.role {
            Role::Param(_) => b.len(1),
            role if is_result(kind, role) && b.batched => b.len(batch),
            role if is_result(kind, role) => b.len(1) * if runs > 1 { 2 } else { 1 },
            _ => 0,
        })
        .sum();
    elements * 4
}

/// The peak resident memory of this process in bytes (`VmHWM`), where the system reports it
/// (Linux).
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Restarts [`peak_rss`] from the current resident memory (Linux 4.0+); `false` where the
/// system does not allow it.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The largest run size in `1..=max_batch` whose layout fits `budget` bytes, with that
/// layout; `Err` with the one-example layout if even that does not fit. The arena grows
/// monotonically with the run size, so this is a binary search.
pub fn micro_batch(
    program: &Program,
    kind: EntryKind,
    max_batch: u64,
    budget: u64,
    keep: &[BufId],
) -> Result<Layout, Layout> {
    let fits = |b: u64| {
        let l = layout(program, kind, b, keep);
        if l.bytes() <= budget {
            Ok(l)
        } else {
            Err(l)
        }
    };
    let full = fits(max_batch.max(1));
    if full.is_ok() || max_batch <= 1 {
        return full;
    }
    let one = fits(1)?;
    let (mut lo, mut best, mut hi) = (1, one, max_batch);
    // Invariant: `lo` fits (its layout is `best`), `hi` does not.
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        match fits(mid) {
            Ok(l) => {
                lo = mid;
                best = l;
            }
            Err(_) => hi = mid,
        }
    }
    Ok(best)
}

/// The memory this machine has available now, in bytes (what a session's budget
/// defaults to on the CPU), or `None` where the system does not say.
pub fn available_memory() -> Option<u64> {
    let mut sys = sysinfo::System::new().ok()?;
    sys.refresh_memory();
    let avail = sys.available_memory();
    (avail > 0).then_some(avail)
}

/// The budget a session uses when none is given: 90% of the available memory (the rest
/// is headroom for the results, the host's parameter copies and the allocator), or 1 TiB
/// (in effect no limit) where the system does not report it.
pub fn default_budget() -> u64 {
    available_memory().map_or(1 << 40, |m| m / 10 * 9)
}

/// `bytes` for people: `512 B`, `3.2 MiB`, `14.1 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CompileOptions, Module};

    fn module() -> Module {
        let src = "model m { input x: [1, 8, 8]; label y: classes(3); \
                   h = relu(c1: conv2d(x, 4, kernel=3, padding=1)); \
                   h = tanh(c2: conv2d(h, 4, kernel=3, padding=1)); \
                   logits = fc: linear(flatten(h), 3); loss cross_entropy(logits, y); }";
        Module::from_source("m", src, &CompileOptions::new(8)).unwrap()
    }

    /// Buffers whose lifetimes overlap never share memory; some that do not, do.
    #[test]
    fn layouts_never_overlap_live_buffers_and_reuse_dead_ones() {
        let m = module();
        let p = &m.program;
        for e in &p.entries {
            let l = layout(p, e.kind, 8, &[]);
            let mut all = 0;
            for launch in &e.launches {
                let mut ranges: Vec<(u64, u64)> = launch
                    .args
                    .iter()
                    .map(|id| {
                        let o = l.offsets[id.0 as usize].unwrap();
                        (o, o + p.buffer(*id).len(8))
                    })
                    .collect();
                ranges.sort();
                for w in ranges.windows(2) {
                    assert!(w[0].1 <= w[1].0, "{:?}: one launch's buffers overlap: {ranges:?}", e.kind);
                }
            }
            for (i, o) in l.offsets.iter().enumerate() {
                if o.is_some() {
                    all += p.buffers[i].len(8);
                    assert!(o.unwrap() % ALIGN == 0);
                }
            }
            assert!(l.len <= all + ALIGN * p.buffers.len() as u64);
            if e.kind == EntryKind::ClippedSum {
                assert!(l.len < all, "the clipped sum reuses nothing: {} of {all}", l.len);
            }
        }
    }

    #[test]
    fn micro_batch_is_the_largest_that_fits() {
        let m = module();
        let p = &m.program;
        let k = EntryKind::ClippedSum;
        let full = layout(p, k, 8, &[]);
        assert_eq!(micro_batch(p, k, 8, full.bytes(), &[]).unwrap().batch, 8);
        let three = layout(p, k, 3, &[]).bytes();
        assert_eq!(micro_batch(p, k, 8, three, &[]).unwrap().batch, 3);
        assert_eq!(micro_batch(p, k, 8, three + 3, &[]).unwrap().batch, 3);
        assert!(micro_batch(p, k, 8, 16, &[]).is_err());
    }
}
