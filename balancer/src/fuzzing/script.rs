//! Reading an admission script (see the parent module's docs for the notation).

use std::time::Duration;

/// Most events one script plays, so that every input runs quickly.
const MAX_EVENTS: usize = 256;

/// The balancer a script starts with.
#[derive(Clone, Copy, Debug)]
pub(super) struct Setup {
    pub(super) limit: usize,
    pub(super) capacity: usize,
    pub(super) workers: usize,
    pub(super) timeout: Duration,
}

/// One event of a script.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Event {
    /// `racing`: before the requests woken by the event before have run.
    Arrive {
        slow: bool,
        racing: bool,
    },
    Respond(usize),
    Complete(usize),
    Cancel(usize),
    Wait(u64),
    AddWorker,
    Drain(usize),
    Limit(usize),
}

/// The set-up and the events of `script`.
pub(super) fn parse(script: &[u8]) -> (Setup, Vec<Event>) {
    let mut setup = Setup {
        limit: 2,
        capacity: 4,
        workers: 1,
        timeout: Duration::from_millis(100),
    };
    let mut events = Vec::new();
    let mut at = 0;
    while at < script.len() && events.len() < MAX_EVENTS {
        let letter = script[at];
        at += 1;
        let digits = script[at..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        let number = script[at..at + digits]
            .iter()
            .take(6)
            .fold(0usize, |n, d| n * 10 + usize::from(d - b'0'));
        at += digits;
        let event = match letter {
            b'L' if events.is_empty() => {
                setup.limit = number.clamp(1, 4);
                continue;
            }
            b'Q' if events.is_empty() => {
                setup.capacity = number.min(8);
                continue;
            }
            b'W' if events.is_empty() => {
                setup.workers = number.min(3);
                continue;
            }
            b'T' if events.is_empty() => {
                setup.timeout = Duration::from_millis(number.clamp(1, 10_000) as u64);
                continue;
            }
            b'a' | b's' | b'A' | b'S' => Event::Arrive {
                slow: letter.eq_ignore_ascii_case(&b's'),
                racing: letter.is_ascii_uppercase(),
            },
            b'r' => Event::Respond(number),
            b'c' => Event::Complete(number),
            b'x' => Event::Cancel(number),
            b't' => Event::Wait(number as u64),
            b'w' => Event::AddWorker,
            b'd' => Event::Drain(number),
            b'l' => Event::Limit(number.clamp(1, 4)),
            _ => continue,
        };
        events.push(event);
    }
    (setup, events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_read_as_documented() {
        let (setup, events) = parse(b"L3 Q0 W2 T50 a s r0 c1 x2 t20 w d1 l9 ? S");
        assert_eq!(
            (setup.limit, setup.capacity, setup.workers, setup.timeout),
            (3, 0, 2, Duration::from_millis(50))
        );
        assert_eq!(
            events,
            [
                Event::Arrive {
                    slow: false,
                    racing: false
                },
                Event::Arrive {
                    slow: true,
                    racing: false
                },
                Event::Respond(0),
                Event::Complete(1),
                Event::Cancel(2),
                Event::Wait(20),
                Event::AddWorker,
                Event::Drain(1),
                Event::Limit(4),
                Event::Arrive {
                    slow: true,
                    racing: true
                },
            ]
        );
    }
}
