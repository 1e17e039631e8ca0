//! The attached programs as the kernel reports them, found through the pinned links: id, size
//! and, while the kernel's BPF run-time statistics are on, how often each ran and for how long.
//! This is what the datapath costs in CPU time; `mesh programs --sample SECS` measures it live.
#![forbid(unsafe_code)]
use std::{path::Path, time::Duration};

use aya::programs::{
    ProgramInfo,
    links::{FdLink, PinnedLink},
    loaded_programs,
};
use mesh_common::program_names;
use serde::Serialize;

use super::loader::link_pin;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ProgramRow {
    pub name: &'static str,
    pub id: u32,
    /// Runs counted while statistics were on (zero when they never were).
    pub run_count: u64,
    pub run_time_ns: u64,
    /// Size after the verifier (bytecode) and after JIT (machine code).
    pub translated_bytes: u32,
    pub jited_bytes: u32,
}

impl ProgramRow {
    pub fn ns_per_run(&self) -> Option<u64> {
        (self.run_count > 0).then(|| self.run_time_ns / self.run_count)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProgramsError {
    #[error("pinned link {0}: {1}")]
    Link(std::path::PathBuf, #[source] aya::programs::links::LinkError),
    #[error("no pinned program links under {0}")]
    NoLinks(std::path::PathBuf),
    #[error("enabling BPF run-time statistics: {0}")]
    Stats(#[source] aya::sys::SyscallError),
}

/// Every program attached through a link pinned under `pin_dir`, in program_names order.
pub fn attached(pin_dir: &Path) -> Result<Vec<ProgramRow>, ProgramsError> {
    let mut wanted = Vec::new();
    for name in program_names::ALL.iter().chain(program_names::REDIRECTION.iter()).chain(program_names::ON_DEMAND.iter()) {
        let pin = link_pin(pin_dir, name);
        if !pin.exists() {
            continue;
        }
        let link: FdLink = PinnedLink::from_pin(&pin).map_err(|e| ProgramsError::Link(pin.clone(), e))?.into();
        let info = link.info().map_err(|e| ProgramsError::Link(pin.clone(), e))?;
        wanted.push((*name, info.program_id()));
    }
    if wanted.is_empty() {
        return Err(ProgramsError::NoLinks(pin_dir.to_owned()));
    }
    let infos: Vec<ProgramInfo> = loaded_programs().filter_map(Result::ok).filter(|p| wanted.iter().any(|(_, id)| *id == p.id())).collect();
    Ok(wanted
        .into_iter()
        .filter_map(|(name, id)| {
            let p = infos.iter().find(|p| p.id() == id)?;
            Some(ProgramRow {
                name,
                id,
                run_count: p.run_count(),
                run_time_ns: p.run_time().as_nanos() as u64,
                translated_bytes: p.size_translated().unwrap_or(0),
                jited_bytes: p.size_jitted(),
            })
        })
        .collect())
}

/// Turns statistics on for `window` and returns what ran meanwhile.
pub fn sample(pin_dir: &Path, window: Duration) -> Result<Vec<ProgramRow>, ProgramsError> {
    // On while this fd is open (BPF_ENABLE_STATS, 5.8+); nothing global is left changed.
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(ProgramsError::Stats)?;
    let before = attached(pin_dir)?;
    eprintln!("sampling the datapath for {window:?}...");
    std::thread::sleep(window);
    let after = attached(pin_dir)?;
    drop(stats);
    Ok(difference(&before, &after))
}

/// `after` minus `before`, program by program (matched by id: a restart swaps programs).
pub fn difference(before: &[ProgramRow], after: &[ProgramRow]) -> Vec<ProgramRow> {
    after
        .iter()
        .map(|a| {
            let b = before.iter().find(|b| b.id == a.id);
            ProgramRow {
                run_count: a.run_count.saturating_sub(b.map_or(0, |b| b.run_count)),
                run_time_ns: a.run_time_ns.saturating_sub(b.map_or(0, |b| b.run_time_ns)),
                ..a.clone()
            }
        })
        .collect()
}

pub fn print_table(rows: &[ProgramRow], window: Option<Duration>) {
    println!("{:<16} {:>7} {:>12} {:>12} {:>9} {:>10} {:>10}", "PROGRAM", "ID", "RUNS", "TIME", "NS/RUN", "XLATED", "JITED");
    for r in rows {
        println!(
            "{:<16} {:>7} {:>12} {:>12} {:>9} {:>10} {:>10}",
            r.name,
            r.id,
            r.run_count,
            format!("{:.3?}", Duration::from_nanos(r.run_time_ns)),
            r.ns_per_run().map_or("-".into(), |n| n.to_string()),
            r.translated_bytes,
            r.jited_bytes
        );
    }
    let total: u64 = rows.iter().map(|r| r.run_time_ns).sum();
    match window {
        Some(w) => println!(
            "datapath CPU time: {:.3?} in {w:?} ({:.3}% of one CPU)",
            Duration::from_nanos(total),
            total as f64 / w.as_nanos() as f64 * 100.0
        ),
        None if rows.iter().all(|r| r.run_count == 0) => {
            println!("run counts need the kernel's BPF statistics: `mesh programs --sample SECS` turns them on for a while")
        }
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: u32, runs: u64, ns: u64) -> ProgramRow {
        ProgramRow { name: "mesh_sockops", id, run_count: runs, run_time_ns: ns, translated_bytes: 1, jited_bytes: 1 }
    }

    #[test]
    fn difference_matches_by_id_and_counts_a_new_program_from_zero() {
        let d = difference(&[row(7, 10, 1000)], &[row(7, 15, 1600), row(9, 3, 90)]);
        assert_eq!((d[0].run_count, d[0].run_time_ns, d[0].ns_per_run()), (5, 600, Some(120)));
        assert_eq!((d[1].run_count, d[1].run_time_ns), (3, 90));
        assert_eq!(row(1, 0, 0).ns_per_run(), None);
    }
}
