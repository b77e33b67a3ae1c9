//! Stop strings over streamed text: text that might be the start of a stop string is held back
//! until the next delta says whether it is; the first match ends the text (the stop string itself
//! is left out unless asked for).

/// What one push lets through.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopOutcome {
    /// Text that is certain to be output.
    pub text: String,
    /// A stop string matched: nothing after `text` will be output.
    pub matched: bool,
    /// What followed the match in the text seen so far (never output; a tool-call detector
    /// keeps it).
    pub rest: String,
}

#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    include_stop: bool,
    held: String,
    matched: bool,
}

impl StopMatcher {
    /// Empty stop strings are ignored.
    pub fn new(stops: Vec<String>, include_stop: bool) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            include_stop,
            held: String::new(),
            matched: false,
        }
    }

    pub fn is_active(&self) -> bool {
        !self.stops.is_empty()
    }

    pub fn matched(&self) -> bool {
        self.matched
    }

    pub fn push(&mut self, text: &str) -> StopOutcome {
        if self.matched {
            return StopOutcome {
                text: String::new(),
                matched: true,
                rest: text.to_owned(),
            };
        }
        if self.stops.is_empty() {
            return StopOutcome {
                text: text.to_owned(),
                ..StopOutcome::default()
            };
        }
        self.held.push_str(text);
        let first = self
            .stops
            .iter()
            .filter_map(|stop| self.held.find(stop.as_str()).map(|at| (at, stop.len())))
            .min_by_key(|&(at, len)| (at, std::cmp::Reverse(len)));
        if let Some((at, len)) = first {
            self.matched = true;
            let end = if self.include_stop { at + len } else { at };
            let text = self.held[..end].to_owned();
            let rest = self.held[at + len..].to_owned();
            self.held.clear();
            return StopOutcome {
                text,
                matched: true,
                rest,
            };
        }
        let keep = self
            .stops
            .iter()
            .map(|stop| partial_suffix(&self.held, stop))
            .max()
            .unwrap_or(0);
        let text = self.held[..self.held.len() - keep].to_owned();
        self.held.drain(..self.held.len() - keep);
        StopOutcome {
            text,
            ..StopOutcome::default()
        }
    }

    /// The held-back text, at the end of the stream (it did not turn into a stop string).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Length of the longest proper prefix of `stop` that `text` ends with.
fn partial_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len().min(text.len() + 1))
        .rev()
        .find(|&k| text.is_char_boundary(text.len() - k) && stop.is_char_boundary(k) && text.ends_with(&stop[..k]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], include: bool, deltas: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect(), include);
        let mut out = String::new();
        for d in deltas {
            let o = m.push(d);
            out.push_str(&o.text);
            if o.matched {
                return (out, true);
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    #[test]
    fn holds_back_partial_matches() {
        let mut m = StopMatcher::new(vec!["END".into()], false);
        assert_eq!(m.push("abc E").text, "abc ");
        assert_eq!(m.push("N").text, "");
        let o = m.push("D tail");
        assert_eq!(
            o,
            StopOutcome {
                text: String::new(),
                matched: true,
                rest: " tail".into()
            }
        );
        assert_eq!(run(&["END"], false, &["abc EN", "X"]), ("abc ENX".into(), false));
        assert_eq!(run(&["END"], true, &["abc E", "ND more"]), ("abc END".into(), true));
    }

    #[test]
    fn earliest_match_wins_and_multibyte_is_safe() {
        assert_eq!(run(&["yz", "b"], false, &["abcxyz"]), ("a".into(), true));
        assert_eq!(run(&["数学"], false, &["ab数", "学c"]), ("ab".into(), true));
        assert_eq!(run(&["数学"], false, &["ab数", "x"]), ("ab数x".into(), false));
        assert_eq!(run(&[""], false, &["abc"]), ("abc".into(), false));
    }
}
