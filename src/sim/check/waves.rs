//! `halt`, `max-in-flight` and `wave-order` for one rollout, after every
//! group that changed it.
//!
//! What the checks read is a [`Summary`] of the rollout's hosts: per wave
//! the unsettled, in-flight and raced hosts, the waves offered a dispatch
//! at this instant, and the failed hosts. Walking all hosts of a
//! 10,000-host rollout after every group was a tenth of the simulation, so
//! the summary is kept up to date instead ([`Mirror`]): each group, only
//! the hosts the writer changed are looked at again (the rollout's setters
//! keep the list: `LiveRollout::take_touched`), from the same three maps
//! the full walk reads (`records`, `dispatched`, `skipped`), never from the
//! planner's own index. A violation is always confirmed, and worded, by
//! the full walk ([`walk`]); in debug builds (every seed `cargo test`
//! runs) the full walk runs after every group too and must give the same
//! summary, or the run stops with the invariant `checker`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::{Checker, Violation};
use crate::cp::planner::is_settled;
use crate::cp::store::LiveRollout;
use crate::ids::{Hostname, RolloutId};
use crate::machine::{HostState, Timestamp};
use crate::wire::{Dispatch, Manifest};

/// What the three checks read, per rollout.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Per wave: (unsettled, in flight, in flight after a raced skip).
    /// In flight = the planner's definition: Pending with a standing
    /// dispatch, Activating, Deferred, Soaking. Settled = Converged,
    /// Failed, Reverted, or Pending and skipped (a skipped host reaches its
    /// terminal outcome, counted by its wave).
    waves: BTreeMap<usize, (usize, usize, usize)>,
    /// Waves with a host whose dispatch was issued at this instant.
    offered: BTreeSet<usize>,
    /// Failed or Reverted hosts.
    pub n_failed: usize,
}

impl Summary {
    fn first_unsettled(&self) -> usize {
        self.waves.iter().find(|(_, c)| c.0 > 0).map_or(usize::MAX, |(w, _)| *w)
    }
}

/// One host as the checks see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bits {
    wave: usize,
    settled: bool,
    in_flight: bool,
    /// In flight after the CP skipped it: its ack raced the skip.
    late: bool,
    failed: bool,
    /// Its standing dispatch was issued at this instant.
    offered: bool,
}

fn bits(wave: usize, state: HostState, dispatch: Option<&Dispatch>, skipped: bool, now: Timestamp) -> Bits {
    let in_flight = (state == HostState::Pending && dispatch.is_some())
        || matches!(state, HostState::Activating | HostState::Deferred | HostState::Soaking);
    Bits {
        wave,
        settled: is_settled(state) || (skipped && state == HostState::Pending),
        in_flight,
        late: in_flight && skipped && state != HostState::Pending,
        failed: matches!(state, HostState::Failed | HostState::Reverted),
        offered: dispatch.is_some_and(|d| d.issued_at == now),
    }
}

/// The summary of one rollout, kept up to date host by host.
#[derive(Debug, Default)]
pub struct Mirror {
    hosts: HashMap<Hostname, Bits>,
    summary: Summary,
    /// The hosts offered a dispatch at `offered_at` (few), with their wave.
    offered: BTreeMap<Hostname, usize>,
    offered_at: Option<Timestamp>,
    /// The hosts in flight after a raced skip (few), for the trace.
    late: BTreeSet<Hostname>,
}

impl Mirror {
    /// Every host looked at: a rollout seen for the first time (or since
    /// the CP process restarted).
    pub fn build(r: &LiveRollout, now: Timestamp) -> Result<Mirror, Violation> {
        same_hosts(r)?;
        let mut mirror = Mirror { offered_at: Some(now), ..Mirror::default() };
        for h in r.manifest.hosts.keys() {
            mirror.update(r, h, now);
        }
        mirror.summary.offered = mirror.offered.values().copied().collect();
        Ok(mirror)
    }

    /// The hosts the writer changed since the last call, looked at again.
    pub fn refresh(&mut self, r: &LiveRollout, mut touched: Vec<Hostname>, now: Timestamp) {
        if self.offered_at != Some(now) {
            // Every standing offer was issued at an earlier instant.
            for h in std::mem::take(&mut self.offered).keys() {
                if let Some(b) = self.hosts.get_mut(h) {
                    b.offered = false;
                }
            }
            self.offered_at = Some(now);
        }
        touched.sort_unstable();
        touched.dedup();
        for h in &touched {
            self.update(r, h, now);
        }
        self.summary.offered = self.offered.values().copied().collect();
    }

    fn update(&mut self, r: &LiveRollout, host: &Hostname, now: Timestamp) {
        let new = match (r.manifest.hosts.get(host), r.records.get(host)) {
            (Some(e), Some(rec)) => {
                Some(bits(e.wave, rec.state, r.dispatched.get(host), r.skipped.contains(host), now))
            }
            _ => None,
        };
        let old = match new {
            Some(b) => self.hosts.insert(host.clone(), b),
            None => self.hosts.remove(host),
        };
        if old == new {
            return;
        }
        if let Some(b) = old {
            self.count(b, false);
        }
        if let Some(b) = new {
            self.count(b, true);
        }
        match new {
            Some(b) if b.offered => drop(self.offered.insert(host.clone(), b.wave)),
            _ => drop(self.offered.remove(host)),
        }
        if new.is_some_and(|b| b.late) {
            self.late.insert(host.clone());
        } else {
            self.late.remove(host);
        }
    }

    /// Adds (or takes away) one host's share of the per-wave counts.
    fn count(&mut self, b: Bits, add: bool) {
        let step = |n: &mut usize, yes: bool| match (yes, add) {
            (false, _) => {}
            (true, true) => *n += 1,
            (true, false) => *n -= 1,
        };
        let c = self.summary.waves.entry(b.wave).or_default();
        step(&mut c.0, !b.settled);
        step(&mut c.1, b.in_flight);
        step(&mut c.2, b.late);
        if *c == (0, 0, 0) {
            self.summary.waves.remove(&b.wave);
        }
        step(&mut self.summary.n_failed, b.failed);
    }

    pub fn summary(&self) -> &Summary {
        &self.summary
    }

    /// The hosts in flight after a raced skip, in host order.
    pub fn late(&self) -> impl Iterator<Item = &Hostname> {
        self.late.iter()
    }
}

/// The full walk: the summary from every host, with the lists a
/// violation names.
pub struct Walk<'a> {
    pub summary: Summary,
    in_flight: BTreeMap<usize, Vec<(&'a Hostname, &'static str, bool)>>,
    /// The first unsettled hosts (at most 5) of the first unsettled wave.
    unsettled: Vec<(&'a Hostname, HostState)>,
}

pub fn walk(r: &LiveRollout, now: Timestamp) -> Result<Walk<'_>, Violation> {
    let m = &r.manifest;
    let mut out = Walk { summary: Summary::default(), in_flight: BTreeMap::new(), unsettled: Vec::new() };
    // The CP opens one record per manifest host: both maps have the same
    // keys in the same order, so they are walked side by side; the
    // dispatches and skips, sorted by host too, alongside them.
    same_hosts(r)?;
    let mut first_unsettled = usize::MAX;
    let mut dispatches = r.dispatched.iter().peekable();
    let mut skips = r.skipped.iter().peekable();
    for ((h, e), rec) in m.hosts.iter().zip(r.records.values()) {
        let dispatch = merge_next(&mut dispatches, h, |(d, _)| *d).map(|(_, d)| d);
        let skipped = merge_next(&mut skips, h, |s| *s).is_some();
        let b = bits(e.wave, rec.state, dispatch, skipped, now);
        let c = out.summary.waves.entry(e.wave).or_default();
        c.0 += usize::from(!b.settled);
        c.1 += usize::from(b.in_flight);
        c.2 += usize::from(b.late);
        out.summary.n_failed += usize::from(b.failed);
        if b.offered {
            out.summary.offered.insert(e.wave);
        }
        if !b.settled {
            if e.wave < first_unsettled {
                first_unsettled = e.wave;
                out.unsettled.clear();
            }
            if e.wave == first_unsettled && out.unsettled.len() < 5 {
                out.unsettled.push((h, rec.state));
            }
        }
        if b.in_flight {
            let what = if dispatch.is_some() { "offered" } else { rec.state.as_str() };
            out.in_flight.entry(e.wave).or_default().push((h, what, b.late));
        }
    }
    out.summary.waves.retain(|_, c| *c != (0, 0, 0));
    Ok(out)
}

/// The CP opens one record per manifest host; the checks rely on it.
fn same_hosts(r: &LiveRollout) -> Result<(), Violation> {
    if r.manifest.hosts.len() == r.records.len() {
        return Ok(());
    }
    Err(Violation::new("cp-state", format!("{}: records and manifest hosts differ", r.manifest.rollout_id)))
}

/// The item of `sorted` (ascending by `key`) whose key is `host`, if
/// any, skipping the smaller ones: one comparison per host walked.
fn merge_next<T>(
    sorted: &mut std::iter::Peekable<impl Iterator<Item = T>>,
    host: &Hostname,
    key: impl Fn(&T) -> &Hostname,
) -> Option<T> {
    while let Some(item) = sorted.peek() {
        match key(item).cmp(host) {
            std::cmp::Ordering::Less => drop(sorted.next()),
            std::cmp::Ordering::Equal => return sorted.next(),
            std::cmp::Ordering::Greater => return None,
        }
    }
    None
}

/// Which promise a summary breaks, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broken {
    /// This wave has more hosts in flight than its `max_in_flight`.
    InFlight(usize),
    /// This wave got a dispatch while an earlier one has unsettled hosts.
    Order(usize),
}

/// `max-in-flight` (unless a database was lost: the rebuilt CP cannot
/// know the offers of the lost one) and `wave-order`.
///
/// A host the CP skipped after offering it may already hold the offer
/// (the withdrawal cannot reach back into a long-poll answer on its way);
/// its ack then arrives after the slot was given to another host, and the
/// CP applies it ("an ack that races a skip wins", docs/decisions.md).
/// Such a host is in flight and counted, but may push the wave over
/// `max_in_flight` by itself: the CP could not have known. Every offer is
/// still checked strictly: a wave that receives a new dispatch must be
/// within `max_in_flight` counting every in-flight host, raced ones
/// included.
pub fn judge(m: &Manifest, s: &Summary, db_lost: bool) -> Option<Broken> {
    if !db_lost {
        for (wave, (_, n, n_raced)) in &s.waves {
            let max = m.waves.get(*wave).map_or(0, |w| w.max_in_flight as usize);
            if *n > 0 && (n - n_raced > max || (*n > max && s.offered.contains(wave))) {
                return Some(Broken::InFlight(*wave));
            }
        }
    }
    // The order is a promise about dispatching: no offer made by this
    // group may be in a wave after one with an unsettled host.
    let first = s.first_unsettled();
    s.offered.iter().find(|w| **w > first).map(|w| Broken::Order(*w))
}

/// The violation `broken` is, worded from the full walk.
pub fn explain(id: &RolloutId, r: &LiveRollout, w: &Walk<'_>, broken: Broken, now: Timestamp) -> Violation {
    let m = &r.manifest;
    match broken {
        Broken::InFlight(wave) => {
            let max = m.waves.get(wave).map_or(0, |x| x.max_in_flight as usize);
            let hosts = w.in_flight.get(&wave).map(Vec::as_slice).unwrap_or_default();
            let why = if w.summary.offered.contains(&wave) { " after a new dispatch" } else { "" };
            let hosts: Vec<String> = hosts
                .iter()
                .map(|(h, what, late)| format!("{h} {what}{}", if *late { " (raced its skip)" } else { "" }))
                .collect();
            Violation::new(
                "max-in-flight",
                format!(
                    "{id} wave {wave} has {} hosts in flight{why}, max_in_flight is {max}: {}",
                    hosts.len(),
                    hosts.join(", ")
                ),
            )
        }
        Broken::Order(wave) => {
            let offers: Vec<&str> = r
                .dispatched
                .iter()
                .filter(|(h, d)| d.issued_at == now && m.hosts.get(*h).is_some_and(|e| e.wave == wave))
                .map(|(h, _)| h.as_str())
                .collect();
            Violation::new(
                "wave-order",
                format!(
                    "{id} dispatches {} of wave {wave} while wave {} has unsettled hosts: {}",
                    offers.join(", "),
                    w.summary.first_unsettled(),
                    w.unsettled.iter().map(|(h, state)| format!("{h} {state}")).collect::<Vec<_>>().join(", ")
                ),
            )
        }
    }
}

impl Checker {
    /// The summary of rollout `id` after this group: its mirror brought up
    /// to date (`touched`: the hosts changed since the last call; `None`:
    /// unknown, every host is looked at).
    pub fn wave_summary(
        &mut self,
        id: &RolloutId,
        r: &LiveRollout,
        touched: Option<Vec<Hostname>>,
        now: Timestamp,
    ) -> Result<(), Violation> {
        match (touched, self.mirrors.get_mut(id)) {
            (Some(touched), Some(mirror)) => mirror.refresh(r, touched, now),
            _ => {
                self.mirrors.insert(id.clone(), Mirror::build(r, now)?);
            }
        }
        let Some(mirror) = self.mirrors.get(id) else { return Ok(()) };
        if cfg!(debug_assertions) {
            let full = walk(r, now)?;
            if full.summary != mirror.summary {
                return Err(Violation::new(
                    "checker",
                    format!("{id}: the kept summary {:?} is not the full walk's {:?}", mirror.summary, full.summary),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cp::planner::RolloutState;
    use crate::sim::rng::Rng;

    /// 9 hosts in 3 waves of 3, at most 1 in flight per wave.
    fn rollout() -> LiveRollout {
        let c = "/nix/store/0c3n4iv2w9ab1p6lq0yzf3d8k2m5r7s9-nixos-system-web-1";
        let hosts: serde_json::Map<String, serde_json::Value> =
            (0..9).map(|h| (format!("h{h}"), serde_json::json!({"wave": h / 3, "target_closure": c}))).collect();
        let m = serde_json::json!({
            "schema": 1, "channel": "stable", "ref": "r1", "issued_at": "2026-11-25T12:00:00Z",
            "policy": {"on_health_failure": "rollback-and-halt", "sustained_failure_secs": 60, "max_failed_hosts": 1},
            "waves": [{"name": "a", "soak_secs": 60, "max_in_flight": 1},
                      {"name": "b", "soak_secs": 60, "max_in_flight": 1},
                      {"name": "c", "soak_secs": 60, "max_in_flight": 1}],
            "hosts": hosts,
        });
        let m = Manifest::parse(&serde_json::to_vec(&m).expect("json")).expect("a valid manifest");
        LiveRollout::published(m, String::new(), RolloutState::Active)
    }

    fn host(i: usize) -> Hostname {
        Hostname::parse(&format!("h{i}")).expect("valid")
    }

    fn offer(r: &mut LiveRollout, i: usize, at: Timestamp) {
        let d = Dispatch {
            rollout_id: r.manifest.rollout_id.clone(),
            target_closure: r.manifest.hosts[&host(i)].target_closure.clone(),
            wave: i / 3,
            soak_secs: 60,
            issued_at: at,
        };
        r.insert_dispatch(host(i), d);
    }

    fn set_state(r: &mut LiveRollout, i: usize, state: HostState) {
        let mut rec = r.records[&host(i)].clone();
        rec.state = state;
        r.set_record(rec);
    }

    /// The kept summary after the touched hosts are looked at again.
    fn kept(mirror: &mut Mirror, r: &mut LiveRollout, now: Timestamp) -> Summary {
        let touched = r.take_touched().expect("kept since the mirror was built");
        mirror.refresh(r, touched, now);
        mirror.summary().clone()
    }

    /// The promises break as the full walk says, and the kept summary
    /// sees it too: a second offer in a wave of one, an offer past an
    /// unsettled wave, a settled wave that lets the next one start.
    #[test]
    fn judge_catches_a_planner_that_breaks_its_promises() {
        let t = |s: i64| crate::sim::T0 + time::Duration::seconds(s);
        let mut r = rollout();
        let mut mirror = Mirror::build(&r, t(0)).expect("builds");
        assert!(r.take_touched().is_none(), "not kept before the first call");
        offer(&mut r, 0, t(1));
        let s = kept(&mut mirror, &mut r, t(1));
        assert_eq!(judge(&r.manifest, &s, false), None);
        offer(&mut r, 1, t(2));
        let s = kept(&mut mirror, &mut r, t(2));
        assert_eq!(judge(&r.manifest, &s, false), Some(Broken::InFlight(0)));
        assert_eq!(judge(&r.manifest, &s, true), None, "not judged after a database loss");
        let w = walk(&r, t(2)).expect("walks");
        assert_eq!(w.summary, s);
        let v = explain(&r.manifest.rollout_id.clone(), &r, &w, Broken::InFlight(0), t(2));
        assert!(v.message.contains("wave 0 has 2 hosts in flight after a new dispatch"), "{v}");
        r.remove_dispatch(&host(1));
        set_state(&mut r, 0, HostState::Soaking);
        let s = kept(&mut mirror, &mut r, t(3));
        assert_eq!(judge(&r.manifest, &s, false), None);
        offer(&mut r, 3, t(4));
        let s = kept(&mut mirror, &mut r, t(4));
        assert_eq!(judge(&r.manifest, &s, false), Some(Broken::Order(1)));
        let w = walk(&r, t(4)).expect("walks");
        let v = explain(&r.manifest.rollout_id.clone(), &r, &w, Broken::Order(1), t(4));
        assert!(v.message.contains("dispatches h3 of wave 1 while wave 0 has unsettled hosts: h0 Soaking"), "{v}");
        // Wave 0 settles (a skip settles a Pending host): wave 1 may start.
        set_state(&mut r, 0, HostState::Converged);
        r.insert_skip(host(1));
        set_state(&mut r, 2, HostState::Failed);
        let s = kept(&mut mirror, &mut r, t(4));
        assert_eq!((judge(&r.manifest, &s, false), s.n_failed), (None, 1));
        assert_eq!(walk(&r, t(4)).expect("walks").summary, s);
    }

    /// Random changes through the setters, random instants: the kept
    /// summary is always the full walk's, raced skips included.
    #[test]
    fn kept_summary_equals_the_full_walk() {
        let t = |ms: u64| crate::sim::world::at(ms);
        let mut rng = Rng::new(11);
        for _ in 0..50 {
            let mut r = rollout();
            let mut now = 0;
            let mut mirror = Mirror::build(&r, t(now)).expect("builds");
            let _ = r.take_touched();
            for _ in 0..60 {
                now += rng.range(0, 2);
                for _ in 0..rng.range(0, 3) {
                    let i = rng.range(0, 8) as usize;
                    match rng.range(0, 3) {
                        0 => offer(&mut r, i, t(now)),
                        1 => drop(r.remove_dispatch(&host(i))),
                        2 => drop(r.insert_skip(host(i))),
                        _ => set_state(&mut r, i, HostState::ALL[rng.range(0, 6) as usize]),
                    }
                }
                let s = kept(&mut mirror, &mut r, t(now));
                assert_eq!(s, walk(&r, t(now)).expect("walks").summary);
                let late: Vec<&Hostname> = mirror.late().collect();
                let want: Vec<Hostname> = (0..9)
                    .map(host)
                    .filter(|h| {
                        let rec = &r.records[h];
                        r.skipped.contains(h)
                            && matches!(rec.state, HostState::Activating | HostState::Deferred | HostState::Soaking)
                    })
                    .collect();
                assert_eq!(late, want.iter().collect::<Vec<_>>());
            }
        }
    }
}
