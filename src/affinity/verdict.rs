//! What became of a request's session: one [`Verdict`] per request, logged, counted per
//! backend and exported as a metric label. The list of verdicts is written once, in
//! [`Verdict::ALL`]; labels and counter indexes follow from it.

/// What became of a request's session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The pool has no affinity.
    Off,
    /// The session's backend served it.
    Hit,
    /// No session key: a new session was placed.
    New,
    /// The session's backend could not serve it; the session moved (or, in a strict pool,
    /// was refused). Or, with `Reason::Rebalance`, the idle session was moved off a backend
    /// holding more than its share.
    Repin(Reason),
    /// A token was presented but had expired: a new session was placed.
    Expired,
    /// A token was presented but could not be opened (forged, truncated, unknown key).
    Invalid,
    /// A hashed key's backend was over its bounded-load cap; the next one took it.
    Overload,
}

/// Why a session could not stay on its backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Down,
    Disabled,
    Removed,
    Drained,
    /// It could have, but it was idle and its backend held more than its share of the
    /// pool's sessions (`affinity.rebalance`).
    Rebalance,
}

/// How many verdicts there are: the size of per-backend verdict counters.
pub const VERDICTS: usize = Verdict::ALL.len();

impl Verdict {
    /// Every verdict with its label, in counter-index order.
    pub const ALL: [(Verdict, &'static str); 11] = [
        (Verdict::Off, "-"),
        (Verdict::Hit, "hit"),
        (Verdict::New, "new"),
        (Verdict::Repin(Reason::Down), "repin:down"),
        (Verdict::Repin(Reason::Disabled), "repin:disabled"),
        (Verdict::Repin(Reason::Removed), "repin:removed"),
        (Verdict::Repin(Reason::Drained), "repin:drained"),
        (Verdict::Expired, "expired"),
        (Verdict::Invalid, "invalid"),
        (Verdict::Overload, "overload"),
        (Verdict::Repin(Reason::Rebalance), "repin:rebalance"),
    ];

    /// A dense index for per-backend counters: the verdict's place in [`Verdict::ALL`].
    pub fn index(self) -> usize {
        match self {
            Verdict::Off => 0,
            Verdict::Hit => 1,
            Verdict::New => 2,
            Verdict::Repin(Reason::Down) => 3,
            Verdict::Repin(Reason::Disabled) => 4,
            Verdict::Repin(Reason::Removed) => 5,
            Verdict::Repin(Reason::Drained) => 6,
            Verdict::Expired => 7,
            Verdict::Invalid => 8,
            Verdict::Overload => 9,
            Verdict::Repin(Reason::Rebalance) => 10,
        }
    }

    pub fn as_str(self) -> &'static str {
        Verdict::ALL[self.index()].1
    }

    /// The re-pin reason as the re-pin header and logs spell it (`down`, `drained`, ...).
    pub fn reason(self) -> Option<&'static str> {
        match self {
            Verdict::Repin(_) => Some(&self.as_str()["repin:".len()..]),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_follow_the_table() {
        for (i, (v, label)) in Verdict::ALL.iter().enumerate() {
            assert_eq!(v.index(), i, "{v:?} is out of place in Verdict::ALL");
            assert_eq!(v.as_str(), *label);
        }
        assert_eq!(Verdict::Repin(Reason::Down).as_str(), "repin:down");
        assert_eq!(Verdict::Repin(Reason::Drained).reason(), Some("drained"));
        assert_eq!(Verdict::Repin(Reason::Rebalance).reason(), Some("rebalance"));
        assert_eq!(Verdict::Hit.reason(), None);
    }
}
