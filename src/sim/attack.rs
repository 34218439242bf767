//! The `huge-seq` scenario: numbers beyond their bounds. Two forms of the
//! "lost seq" divergence (`docs/simulator.md`, divergence 9), both against host 0 while it soaks:
//!
//! - an attacker (or a broken agent) posts, as the host, a copy of the
//!   host's latest ProbeResult with seq `u64::MAX`. The old code stored it wrapped
//!   (−1), the host's last seq read back as 2^64−1, and every later real
//!   event was answered `duplicate` and retired by the agent: lost. Today
//!   `wire::MAX_SEQ` refuses it (`rejected`, "malformed event"), and the
//!   store's `Db::int` and the gap rule would refuse it again.
//! - bit rot leaves a queue file named with qseq `u64::MAX` in `pending/`
//!   while the agent is down. The old queue took it as its highest qseq and
//!   numbered the next event 0 (wrapped), so pending events vanished and
//!   seqs were reused. Today names beyond `queue::MAX_QSEQ` do not count.
//!
//! Neither is judged here: if the CP took the seq, the host's next real
//! event is answered `duplicate` without being in the log (`acked-not-lost`)
//! and at the end the CP's last seq differs from the agent's (`agreement`);
//! a wrapped queue re-uses a seq the CP already has (`acked-not-lost`,
//! `agreement`). See docs/simulator.md for how that was confirmed.

use super::check::Violation;
use super::cp::{Answer, Work};
use super::{Ev, Sim};
use crate::machine::HostState;
use crate::queue::{record, Storage as _};
use crate::wire::BatchItem;

/// The host the scenario works on.
const HOST: usize = 0;

impl Sim {
    /// Waits (up to 40 tries, 5 s apart) for host 0 to soak with a
    /// ProbeResult in its journal, then attacks.
    pub(super) fn huge_seq(&mut self, tries: u32) -> Result<(), Violation> {
        let soaking = self.agents[HOST].rollouts().and_then(|r| {
            r.iter().find(|(_, s)| s.record.state == HostState::Soaking).map(|(id, s)| (id.clone(), s.record.last_seq))
        });
        // The host's latest ProbeResult: legal again while it soaks, so
        // only the seq bound stands between it and the record.
        let found = soaking.and_then(|(id, last)| {
            (1..=last).rev().find_map(|seq| {
                let path = self.agents[HOST].event_file(&id, seq)?;
                let bytes = self.agents[HOST].storage.read(&path)?;
                let first = record::decode(&bytes).ok().filter(|q| q.event.kind() == "ProbeResult")?;
                Some((id.clone(), bytes, first))
            })
        });
        let Some((id, bytes, first)) = found else {
            if tries < 40 {
                self.after(5_000, Ev::HugeSeq { tries: tries + 1 });
            }
            return Ok(());
        };
        if !self.cp.is_up() {
            self.after(5_000, Ev::HugeSeq { tries });
            return Ok(());
        }
        let hostname = self.agents[HOST].host.clone();
        let mut event = first.event.clone();
        event.seq = u64::MAX;
        let item = BatchItem { rollout_id: id.clone(), event };
        let answers = self.cp.run(vec![Work::Ingest(hostname.clone(), vec![item])]);
        self.stats.groups += 1;
        let answer = match answers.first() {
            Some(Answer::Events(results)) => results
                .first()
                .map(|r| format!("{:?}: {}", r.status, r.reason.as_deref().unwrap_or("-")))
                .unwrap_or_else(|| "no result".into()),
            _ => "unavailable".into(),
        };
        self.note(format!("attacker posts {} (seq {}) of {hostname} in {id}: {answer}", first.event.kind(), u64::MAX));
        self.after_cp_group();
        self.check_cp()?;
        // The rotted name: a copy of the same record under qseq u64::MAX,
        // its name's rollout rotted too (a corrupt record of a LIVE rollout
        // is refused at start: `restore` will not guess its lost seqs, the
        // `dropped-rollout` case; here only the numbering is under test).
        self.crash_agent(HOST, "killed (before a queue file name rots)");
        let name = record::file_name(u64::MAX, hostname.as_str(), "stable@r0", first.event.kind());
        let path = self.agents[HOST].queue_dir().join(&name);
        if let Err(e) = self.agents[HOST].storage.write_file(&path, &bytes) {
            return Err(Violation::new("huge-seq", format!("cannot plant {name}: {e}")));
        }
        self.stats.corruptions += 1;
        self.note(format!("{hostname}: queue file {name} appears (rotted name)"));
        self.start_agent(HOST)
    }
}
