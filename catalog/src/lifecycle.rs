//! The payload state machine. Every transition the system makes goes through
//! [`transition`]; anything not listed here is refused with `InvalidState`.

use crate::error::CatalogError;
use crate::model::PayloadState;

/// Something that happens to a payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The writer sealed the bytes; `durable` when the tier keeps them.
    Commit {
        durable: bool,
    },
    /// The writer gave up, or the write deadline passed.
    Abort,
    /// A move to another tier started.
    BeginMove,
    /// The move finished; `durable` describes the new tier.
    FinishMove {
        durable: bool,
    },
    /// The move failed or was cancelled; the payload stays where it was.
    CancelMove {
        durable: bool,
    },
    Delete,
    Expire,
}

/// The state after `event`, or `InvalidState` naming both.
pub fn transition(from: PayloadState, event: Event) -> Result<PayloadState, CatalogError> {
    use Event::*;
    use PayloadState::*;
    let durable_or_active = |durable: bool| if durable { Durable } else { Active };
    let next = match (from, event) {
        (Allocated, Commit { durable }) => durable_or_active(durable),
        (Allocated, Abort) => Aborted,
        (Active | Durable, BeginMove) => Spilling,
        (Spilling, FinishMove { durable }) | (Spilling, CancelMove { durable }) => durable_or_active(durable),
        (Active | Durable | Spilling, Delete) => Deleted,
        (Allocated, Delete) => Aborted,
        (Active | Durable, Expire) => Expired,
        _ => return Err(refusal(from, event)),
    };
    Ok(next)
}

fn refusal(from: PayloadState, event: Event) -> CatalogError {
    let hint = match (from, event) {
        (_, Event::Commit { .. }) => "only an ALLOCATED payload can be committed",
        (PayloadState::Allocated, _) => "commit the payload first",
        (PayloadState::Spilling, _) => "the payload is moving between tiers; retry shortly",
        _ => "the payload is no longer live",
    };
    CatalogError::InvalidState(format!("payload is {}, cannot {:?}: {hint}", from.name(), event))
}

#[cfg(test)]
mod tests {
    use super::*;
    use PayloadState::*;

    const STATES: [PayloadState; 7] = [Allocated, Active, Spilling, Durable, Expired, Deleted, Aborted];

    fn events() -> Vec<Event> {
        let mut all = vec![Event::Abort, Event::BeginMove, Event::Delete, Event::Expire];
        for durable in [false, true] {
            all.push(Event::Commit { durable });
            all.push(Event::FinishMove { durable });
            all.push(Event::CancelMove { durable });
        }
        all
    }

    /// The whole allowed table; every pair not in it must be refused.
    fn allowed(from: PayloadState, event: Event) -> Option<PayloadState> {
        use Event::*;
        match (from, event) {
            (Allocated, Commit { durable: false }) => Some(Active),
            (Allocated, Commit { durable: true }) => Some(Durable),
            (Allocated, Abort) => Some(Aborted),
            (Allocated, Delete) => Some(Aborted),
            (Active, BeginMove) | (Durable, BeginMove) => Some(Spilling),
            (Spilling, FinishMove { durable: true }) => Some(Durable),
            (Spilling, FinishMove { durable: false }) => Some(Active),
            (Spilling, CancelMove { durable: true }) => Some(Durable),
            (Spilling, CancelMove { durable: false }) => Some(Active),
            (Active, Delete) | (Durable, Delete) | (Spilling, Delete) => Some(Deleted),
            (Active, Expire) | (Durable, Expire) => Some(Expired),
            _ => None,
        }
    }

    #[test]
    fn every_allowed_transition_works_and_every_other_is_refused() {
        let mut checked = 0;
        for from in STATES {
            for event in events() {
                let got = transition(from, event);
                match allowed(from, event) {
                    Some(to) => assert_eq!(got.unwrap(), to, "{from:?} + {event:?}"),
                    None => assert!(
                        matches!(got, Err(CatalogError::InvalidState(_))),
                        "{from:?} + {event:?} should be refused, got {got:?}"
                    ),
                }
                checked += 1;
            }
        }
        assert_eq!(checked, STATES.len() * 10);
    }

    #[test]
    fn terminal_states_accept_nothing() {
        for from in [Expired, Deleted, Aborted] {
            for event in events() {
                assert!(transition(from, event).is_err(), "{from:?} + {event:?}");
            }
        }
    }

    #[test]
    fn refusal_message_tells_what_to_do() {
        let err = transition(Active, Event::Commit { durable: false }).unwrap_err();
        assert!(err.to_string().contains("only an ALLOCATED payload can be committed"));
    }
}
