//! Fault schedules: drawn from a seed, applied to the simulated network at set moments, and
//! written as text so a failing one can be kept and replayed.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// The simulated network's usual one-way latency bound, in milliseconds.
pub const BASE_LATENCY_MS: u64 = 5;

/// One fault (or the end of all of them).
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// These members on one side, the others on the other; clients reach both.
    Partition(Vec<u8>),
    /// Messages from the first member to the second are dropped, the other way flows.
    OneWay(u8, u8),
    /// Messages between two members are held back (delayed) until the heal.
    Hold(u8, u8),
    /// Messages between two members take up to this many milliseconds.
    Slow(u8, u8, u64),
    /// Each message breaks its link with this probability per thousand (repaired at random).
    Lossy(u32),
    /// These members crash; they restart from their disks at the heal.
    Crash(Vec<u8>),
    /// The member that leads when this applies is cut off from the other members.
    IsolateLeader,
    /// Everything above is undone and crashed members restart.
    Heal,
}

/// Faults at moments of simulated time, in milliseconds, in order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Schedule {
    /// The faults.
    pub events: Vec<(u64, Fault)>,
}

impl Schedule {
    /// A schedule for `voters` members drawn from `seed`: bursts of one or two faults, each
    /// healed after 0.3 to 2 s, with quiet spells between, and a heal at `run_ms`.
    pub fn draw(voters: u8, seed: u64, run_ms: u64) -> Schedule {
        let mut rng = fastrand::Rng::with_seed(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xfa17);
        let mut events = Vec::new();
        let mut t = rng.u64(200..800);
        while t + 300 < run_ms {
            for _ in 0..(1 + usize::from(rng.u8(..3) == 0)) {
                events.push((t + rng.u64(0..100), fault(&mut rng, voters)));
            }
            let end = (t + rng.u64(300..2_000)).min(run_ms);
            events.push((end, Fault::Heal));
            t = end + rng.u64(100..700);
        }
        events.push((run_ms, Fault::Heal));
        events.sort_by_key(|(at, _)| *at);
        Schedule { events }
    }
}

fn fault(rng: &mut fastrand::Rng, voters: u8) -> Fault {
    let pair = |rng: &mut fastrand::Rng| {
        let a = rng.u8(1..=voters);
        let b = (a + rng.u8(1..voters) - 1) % voters + 1;
        (a, b)
    };
    let some = |rng: &mut fastrand::Rng, most: u8| {
        let mut ids: Vec<u8> = (1..=voters).collect();
        rng.shuffle(&mut ids);
        ids.truncate(usize::from(rng.u8(1..=most)));
        ids.sort_unstable();
        ids
    };
    match rng.u8(..7) {
        0 => Fault::Partition(some(rng, voters - 1)),
        1 => {
            let (a, b) = pair(rng);
            Fault::OneWay(a, b)
        }
        2 => {
            let (a, b) = pair(rng);
            Fault::Hold(a, b)
        }
        3 => {
            let (a, b) = pair(rng);
            Fault::Slow(a, b, rng.u64(20..200))
        }
        4 => Fault::Lossy(rng.u32(5..100)),
        // Now and then a majority, so whole-group restarts from disk happen too.
        5 => Fault::Crash(some(rng, voters / 2 + 1)),
        _ => Fault::IsolateLeader,
    }
}

fn host(id: u8) -> String {
    super::host(id)
}

/// Applies `fault` to the running simulation; `leader` says who leads now (for
/// [`Fault::IsolateLeader`]), `crashed` tracks members to restart at the heal.
pub fn apply(
    sim: &mut turmoil::Sim<'_>,
    ids: &[u8],
    fault: &Fault,
    leader: Option<u8>,
    crashed: &mut Vec<u8>,
) {
    let cut = |sim: &mut turmoil::Sim<'_>, side: &[u8]| {
        for &a in side {
            for &b in ids.iter().filter(|b| !side.contains(b)) {
                sim.partition(host(a), host(b));
            }
        }
    };
    match fault {
        Fault::Partition(side) => cut(sim, side),
        Fault::IsolateLeader => {
            if let Some(l) = leader {
                cut(sim, &[l]);
            }
        }
        Fault::OneWay(a, b) => sim.partition_oneway(host(*a), host(*b)),
        Fault::Hold(a, b) => sim.hold(host(*a), host(*b)),
        Fault::Slow(a, b, ms) => {
            sim.set_link_max_message_latency(host(*a), host(*b), Duration::from_millis(*ms))
        }
        Fault::Lossy(per_mille) => sim.set_fail_rate(f64::from(*per_mille) / 1000.0),
        Fault::Crash(victims) => {
            for &v in victims {
                if !crashed.contains(&v) {
                    sim.crash(host(v));
                    crashed.push(v);
                }
            }
        }
        Fault::Heal => {
            sim.set_fail_rate(0.0);
            for (k, &a) in ids.iter().enumerate() {
                for &b in &ids[k + 1..] {
                    sim.release(host(a), host(b));
                    sim.repair(host(a), host(b));
                    sim.set_link_max_message_latency(
                        host(a),
                        host(b),
                        Duration::from_millis(BASE_LATENCY_MS),
                    );
                }
            }
            for v in crashed.drain(..) {
                sim.bounce(host(v));
            }
        }
    }
}

fn list(ids: &[u8]) -> String {
    ids.iter().map(u8::to_string).collect::<Vec<_>>().join(",")
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Partition(side) => write!(f, "partition {}", list(side)),
            Fault::OneWay(a, b) => write!(f, "oneway {a}>{b}"),
            Fault::Hold(a, b) => write!(f, "hold {a}-{b}"),
            Fault::Slow(a, b, ms) => write!(f, "slow {a}-{b} {ms}"),
            Fault::Lossy(p) => write!(f, "lossy {p}"),
            Fault::Crash(ids) => write!(f, "crash {}", list(ids)),
            Fault::IsolateLeader => write!(f, "isolate-leader"),
            Fault::Heal => write!(f, "heal"),
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (at, fault) in &self.events {
            writeln!(f, "@{at} {fault}")?;
        }
        Ok(())
    }
}

fn ids(s: &str) -> Result<Vec<u8>, String> {
    s.split(',')
        .map(|i| i.trim().parse().map_err(|_| format!("bad member id {i:?}")))
        .collect()
}

fn two(s: &str, sep: char) -> Result<(u8, u8), String> {
    let (a, b) = s
        .split_once(sep)
        .ok_or_else(|| format!("expected two ids around {sep:?} in {s:?}"))?;
    let id = |x: &str| x.parse().map_err(|_| format!("bad member id {x:?}"));
    Ok((id(a)?, id(b)?))
}

impl FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Fault, String> {
        let mut words = s.split_whitespace();
        let kind = words.next().unwrap_or("");
        let arg = words.next().unwrap_or("");
        let num = |w: Option<&str>| -> Result<u64, String> {
            w.and_then(|w| w.parse().ok())
                .ok_or_else(|| format!("expected a number in {s:?}"))
        };
        Ok(match kind {
            "partition" => Fault::Partition(ids(arg)?),
            "oneway" => {
                let (a, b) = two(arg, '>')?;
                Fault::OneWay(a, b)
            }
            "hold" => {
                let (a, b) = two(arg, '-')?;
                Fault::Hold(a, b)
            }
            "slow" => {
                let (a, b) = two(arg, '-')?;
                Fault::Slow(a, b, num(words.next())?)
            }
            "lossy" => Fault::Lossy(num(Some(arg))? as u32),
            "crash" => Fault::Crash(ids(arg)?),
            "isolate-leader" => Fault::IsolateLeader,
            "heal" => Fault::Heal,
            _ => return Err(format!("unknown fault {s:?}")),
        })
    }
}

impl FromStr for Schedule {
    type Err = String;

    fn from_str(s: &str) -> Result<Schedule, String> {
        let mut events = Vec::new();
        for line in s.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let (at, fault) = line
                .strip_prefix('@')
                .and_then(|l| l.split_once(' '))
                .ok_or_else(|| format!("expected \"@MS FAULT\", got {line:?}"))?;
            let at = at.parse().map_err(|_| format!("bad time in {line:?}"))?;
            events.push((at, fault.parse()?));
        }
        Ok(Schedule { events })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schedule_reads_back_from_its_text() {
        for seed in 0..50 {
            for voters in [3, 5] {
                let s = Schedule::draw(voters, seed, 6_000);
                let text = s.to_string();
                assert_eq!(text.parse::<Schedule>(), Ok(s), "{text}");
            }
        }
    }

    #[test]
    fn every_kind_of_fault_is_drawn() {
        let mut kinds = std::collections::BTreeSet::new();
        for seed in 0..20 {
            for (_, f) in Schedule::draw(5, seed, 6_000).events {
                kinds.insert(f.to_string().split(' ').next().map(str::to_owned));
            }
        }
        assert_eq!(kinds.len(), 8, "{kinds:?}");
    }
}
