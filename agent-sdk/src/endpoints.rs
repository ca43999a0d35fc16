//! Which server endpoint the agent tries next, and when it backs off.
//!
//! Pure bookkeeping: the reconnect loop in [`Agent::run`](crate::Agent::run)
//! reports how each stream ended and gets back where to go next and whether
//! to wait the backoff first.

/// What the reconnect loop does before its next attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pause {
    /// Try the next endpoint at once: the round is not over.
    None,
    /// Wait the backoff delay first: a new round begins.
    Backoff,
}

/// The endpoints in failover order and where the agent is in them.
///
/// A *round* is one attempt at every endpoint, starting at the one after
/// where the previous stream ended, so the endpoint that just failed is
/// tried last. Attempts within a round follow each other without delay; a
/// round that failed throughout, or the loss of a welcomed stream, is
/// followed by the backoff delay. Each endpoint is therefore tried at most
/// once per backoff delay, and a dead endpoint costs one failed connect,
/// never a backoff, on the way to a live one.
#[derive(Debug)]
pub(crate) struct Rotation<T> {
    endpoints: Vec<T>,
    current: usize,
    /// Failed attempts since the current round began.
    failed_in_round: usize,
}

impl<T> Rotation<T> {
    /// A rotation starting at the first endpoint; `None` if there is none.
    pub(crate) fn new(endpoints: Vec<T>) -> Option<Self> {
        (!endpoints.is_empty()).then_some(Self { endpoints, current: 0, failed_in_round: 0 })
    }

    /// The endpoint of the next attempt.
    pub(crate) fn current(&self) -> &T {
        // In bounds: `current` is always taken modulo a non-zero length.
        &self.endpoints[self.current]
    }

    /// Records how the attempt at [`current`](Self::current) ended
    /// (`welcomed`: the server had sent a Welcome) and moves to the next
    /// endpoint.
    pub(crate) fn advance(&mut self, welcomed: bool) -> Pause {
        self.current = (self.current + 1) % self.endpoints.len();
        if welcomed {
            // A working stream broke: a fresh round, after the (reset,
            // hence short) backoff delay, as a single-server agent does.
            self.failed_in_round = 0;
            return Pause::Backoff;
        }
        self.failed_in_round += 1;
        if self.failed_in_round >= self.endpoints.len() {
            self.failed_in_round = 0;
            Pause::Backoff
        } else {
            Pause::None
        }
    }

    /// Records that the server at [`current`](Self::current) asked the
    /// agent to reconnect elsewhere: a fresh round at the next endpoint, at
    /// once when there is another one to go to.
    pub(crate) fn moved(&mut self) -> Pause {
        self.current = (self.current + 1) % self.endpoints.len();
        self.failed_in_round = 0;
        if self.endpoints.len() > 1 {
            Pause::None
        } else {
            Pause::Backoff
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `outcomes` (welcomed or not) through a rotation and records the
    /// endpoint of each attempt and the pause after it.
    fn trace(endpoints: &[&'static str], outcomes: &[bool]) -> Vec<(&'static str, Pause)> {
        let mut r = Rotation::new(endpoints.to_vec()).expect("endpoints");
        outcomes
            .iter()
            .map(|&welcomed| {
                let at = *r.current();
                (at, r.advance(welcomed))
            })
            .collect()
    }

    #[test]
    fn a_move_goes_to_the_next_endpoint_at_once() {
        let mut r = Rotation::new(vec!["a", "b"]).expect("endpoints");
        assert_eq!(r.moved(), Pause::None);
        assert_eq!(*r.current(), "b");
        // The round restarts: a failure at b tries a without backoff.
        assert_eq!(r.advance(false), Pause::None);
        assert_eq!(*r.current(), "a");
        let mut single = Rotation::new(vec!["a"]).expect("endpoint");
        assert_eq!(single.moved(), Pause::Backoff, "back to the same server only after the backoff");
    }

    #[test]
    fn empty_is_refused() {
        assert!(Rotation::<&str>::new(Vec::new()).is_none());
    }

    #[test]
    fn one_endpoint_backs_off_after_every_failure() {
        let got = trace(&["a"], &[false, false, true, false]);
        assert_eq!(got, vec![("a", Pause::Backoff); 4]);
    }

    #[test]
    fn dead_endpoints_are_skipped_without_backoff_within_a_round() {
        use Pause::*;
        // a and b dead at start, c answers; later c dies and b answers.
        let got = trace(&["a", "b", "c"], &[false, false, true, false, true]);
        assert_eq!(got, vec![("a", None), ("b", None), ("c", Backoff), ("a", None), ("b", Backoff)]);
    }

    #[test]
    fn the_same_dead_endpoint_is_tried_once_per_backoff() {
        use Pause::*;
        let got = trace(&["a", "b", "c"], &[false; 7]);
        assert_eq!(
            got,
            vec![("a", None), ("b", None), ("c", Backoff), ("a", None), ("b", None), ("c", Backoff), ("a", None)]
        );
        // Between any two attempts at one endpoint lies a backoff.
        for (i, (at, _)) in got.iter().enumerate() {
            if let Some(j) = got[i + 1..].iter().position(|(e, _)| e == at) {
                assert!(got[i..=i + j].iter().any(|(_, p)| *p == Backoff), "{at} retried without backoff");
            }
        }
    }

    #[test]
    fn a_broken_stream_starts_a_round_at_the_next_endpoint() {
        use Pause::*;
        // Connected to a, which then breaks; b and a are dead, so the
        // round b, a fails and backs off; then b answers.
        let got = trace(&["a", "b"], &[true, false, false, true]);
        assert_eq!(got, vec![("a", Backoff), ("b", None), ("a", Backoff), ("b", Backoff)]);
    }
}
