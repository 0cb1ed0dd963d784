//! A staged publish's policy, as the operator writes it: the steps, the
//! soak time, the failure threshold, canaries, label targeting and the
//! maintenance window, read from `PUT bins/NAME?rollout=…` or from the
//! server config's `rollouts` entry. Pure parsing; errors name the field.

use crate::json::Value;

/// The policy of a staged publish: from `PUT bins/NAME?rollout=…` or the
/// server config's `rollouts` entry for the binary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Percentages, strictly increasing, the last one 100.
    pub steps: Vec<u8>,
    /// How long a node must run the new build (and a step must last, at
    /// most) before it counts as a success.
    pub soak_seconds: u64,
    /// Failures that pause the rollout.
    pub max_failures: Threshold,
    /// Nodes that get the build first, by name.
    pub canary: Vec<String>,
    /// Nodes that get the build first, by label (all must match).
    pub canary_labels: Vec<(String, String)>,
    /// Only nodes whose labels match all of these take part; the rest keep
    /// their build.
    pub selector: Vec<(String, String)>,
    /// When nodes may switch builds (UTC); `None`: any time.
    pub window: Option<Window>,
}

/// When the health gate pauses a rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threshold {
    /// This many failed nodes.
    Count(u64),
    /// This percentage of the nodes that tried the build (at least one).
    Percent(u8),
}

/// UTC days of the week and hours in which nodes may switch builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Bit 0 = Monday … bit 6 = Sunday.
    pub days: u8,
    /// First hour in the window (0–23).
    pub from_hour: u8,
    /// First hour after it (1–24); below `from_hour` the window wraps past
    /// midnight (`22-04`).
    pub to_hour: u8,
}

impl Policy {
    /// Reads a policy from a staged publish's query: `rollout=1,10,100`,
    /// `soak=SECS`, `maxFailures=N|P%`, `canary=a,b`, `canaryLabel=k=v`
    /// (repeatable), `match=k=v` (repeatable), `window=mon-fri@02-05`.
    /// `None` when the query asks for no rollout.
    pub fn from_query(pairs: &[(String, String)]) -> Result<Option<Policy>, String> {
        let Some(steps) = pairs.iter().find(|(k, _)| k == "rollout") else {
            return Ok(None);
        };
        let mut p = Policy::new(parse_steps(&steps.1)?);
        for (k, v) in pairs {
            match k.as_str() {
                "soak" => {
                    p.soak_seconds = parse_seconds(v).ok_or(format!(
                        "soak: \"{v}\" is not a number of seconds (e.g. 600, 10m, 1h)"
                    ))?
                }
                "maxFailures" => p.max_failures = parse_threshold(v)?,
                "canary" => p.canary.extend(names(v)?),
                "canaryLabel" => p.canary_labels.push(parse_label(v, "canaryLabel")?),
                "match" => p.selector.push(parse_label(v, "match")?),
                "window" => p.window = Some(Window::parse(v)?),
                _ => {}
            }
        }
        p.canary_labels.sort();
        p.selector.sort();
        Ok(Some(p))
    }

    /// Reads a policy from the config's `rollouts` entry: `{"steps": [1,
    /// 10, 100], "soakSeconds": 600, "maxFailures": 2 or "5%", "canary":
    /// ["n1"], "canaryLabels": {"group": "canary"}, "match": {"region":
    /// "eu"}, "window": "mon-fri@02-05"}`.
    pub fn from_json(v: &Value) -> Result<Policy, String> {
        let Value::Obj(entries) = v else {
            return Err(format!("must be an object, not {}", v.kind()));
        };
        let steps = match v.get("steps") {
            Some(Value::Arr(items)) => {
                let text: Vec<String> = items.iter().map(Value::to_compact).collect();
                parse_steps(&text.join(","))?
            }
            Some(other) => {
                return Err(format!(
                    "\"steps\" must be a list of percentages, not {}",
                    other.kind()
                ))
            }
            None => return Err("\"steps\" is missing (e.g. [1, 10, 50, 100])".into()),
        };
        let mut p = Policy::new(steps);
        let labels = |key: &str, v: &Value| -> Result<Vec<(String, String)>, String> {
            let Value::Obj(pairs) = v else {
                return Err(format!("\"{key}\" must be an object of strings"));
            };
            let mut out = Vec::new();
            for (k, val) in pairs {
                let val = val
                    .as_str()
                    .ok_or(format!("\"{key}\".\"{k}\" must be a string"))?;
                out.push(parse_label(&format!("{k}={val}"), key)?);
            }
            out.sort();
            Ok(out)
        };
        for (key, value) in entries {
            match key.as_str() {
                "steps" => {}
                "soakSeconds" => {
                    p.soak_seconds = value.as_u64().ok_or("\"soakSeconds\" must be a whole number of seconds")?
                }
                "maxFailures" => {
                    let text = match value {
                        Value::Str(s) => s.clone(),
                        other => other.to_compact(),
                    };
                    p.max_failures = parse_threshold(&text)?;
                }
                "canary" => {
                    let Value::Arr(items) = value else {
                        return Err("\"canary\" must be a list of node names".into());
                    };
                    for item in items {
                        let name = item.as_str().ok_or("\"canary\" must be a list of node names")?;
                        p.canary.extend(names(name)?);
                    }
                }
                "canaryLabels" => p.canary_labels = labels(key, value)?,
                "match" => p.selector = labels(key, value)?,
                "window" => {
                    let text = value.as_str().ok_or("\"window\" must be a string like \"mon-fri@02-05\"")?;
                    p.window = Some(Window::parse(text)?);
                }
                other => {
                    return Err(format!(
                        "unknown key \"{other}\" (known: steps, soakSeconds, maxFailures, canary, canaryLabels, match, window)"
                    ))
                }
            }
        }
        Ok(p)
    }

    /// The policy of a plain publish: the whole fleet at once.
    pub fn whole_fleet() -> Policy {
        Policy::new(vec![100])
    }

    fn new(steps: Vec<u8>) -> Policy {
        Policy {
            steps,
            soak_seconds: DEFAULT_SOAK,
            max_failures: Threshold::Count(1),
            canary: Vec::new(),
            canary_labels: Vec::new(),
            selector: Vec::new(),
            window: None,
        }
    }

    pub(super) fn has_canaries(&self) -> bool {
        !self.canary.is_empty() || !self.canary_labels.is_empty()
    }

    /// How many phases there are (the canary phase, then the steps).
    pub fn phases(&self) -> usize {
        self.steps.len() + usize::from(self.has_canaries())
    }
}

/// Soak time when a policy names none.
pub const DEFAULT_SOAK: u64 = 300;

impl Window {
    /// `DAYS@HH-HH`: days as `mon-fri`, `sat,sun`, `*`; hours in UTC, the
    /// second one exclusive (`02-05` is 02:00–04:59), wrapping past
    /// midnight when it is the smaller (`22-04`). Without `@`, every day.
    pub fn parse(text: &str) -> Result<Window, String> {
        let bad =
            || format!("window \"{text}\": use DAYS@HH-HH in UTC, e.g. mon-fri@02-05 or *@22-04");
        let (days, hours) = match text.split_once('@') {
            Some((d, h)) => (d, h),
            None => ("*", text),
        };
        let mut mask = 0u8;
        for part in days.split(',') {
            let part = part.trim().to_ascii_lowercase();
            if part == "*" {
                mask = 0x7f;
                continue;
            }
            let (a, b) = part.split_once('-').unwrap_or((&part, &part));
            let (a, b) = (weekday(a).ok_or_else(bad)?, weekday(b).ok_or_else(bad)?);
            let mut d = a;
            loop {
                mask |= 1 << d;
                if d == b {
                    break;
                }
                d = (d + 1) % 7;
            }
        }
        let (a, b) = hours.split_once('-').ok_or_else(bad)?;
        let hour = |s: &str| s.trim().parse::<u8>().ok().filter(|h| *h <= 24);
        let (from_hour, to_hour) = (hour(a).ok_or_else(bad)?, hour(b).ok_or_else(bad)?);
        if from_hour == to_hour || from_hour > 23 {
            return Err(bad());
        }
        Ok(Window {
            days: mask,
            from_hour,
            to_hour,
        })
    }

    /// Whether `now` (seconds since the epoch) lies in the window. A window
    /// that wraps past midnight belongs to the day it starts on.
    pub fn contains(&self, now: u64) -> bool {
        let (day, hour) = ((now / 86_400 + 3) % 7, (now % 86_400 / 3600) as u8); // 1970-01-01 was a Thursday
        let on = |d: u64| self.days & (1 << d) != 0;
        if self.from_hour < self.to_hour {
            on(day) && (self.from_hour..self.to_hour).contains(&hour)
        } else {
            (on(day) && hour >= self.from_hour) || (on((day + 6) % 7) && hour < self.to_hour)
        }
    }

    /// The form [`Window::parse`] reads.
    pub fn text(&self) -> String {
        const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
        let days = if self.days == 0x7f {
            "*".to_string()
        } else {
            let on: Vec<&str> = (0..7)
                .filter(|d| self.days & (1 << d) != 0)
                .map(|d| DAYS[d])
                .collect();
            on.join(",")
        };
        format!("{days}@{:02}-{:02}", self.from_hour, self.to_hour)
    }
}

fn weekday(s: &str) -> Option<u8> {
    const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    DAYS.iter()
        .position(|d| s.starts_with(d) && d.len() <= s.len() && s.len() <= 9)
        .map(|d| d as u8)
}

fn parse_steps(text: &str) -> Result<Vec<u8>, String> {
    let mut steps = Vec::new();
    for part in text.split(',') {
        let part = part.trim().trim_end_matches('%');
        let pct: u8 = part
            .parse()
            .ok()
            .filter(|p| (1..=100).contains(p))
            .ok_or_else(|| {
                format!("rollout steps: \"{part}\" is not a percentage from 1 to 100")
            })?;
        if steps.last().is_some_and(|last| *last >= pct) {
            return Err(format!("rollout steps must increase: \"{text}\""));
        }
        steps.push(pct);
    }
    if steps.last() != Some(&100) {
        return Err(format!("rollout steps must end with 100: \"{text}\""));
    }
    Ok(steps)
}

fn parse_threshold(text: &str) -> Result<Threshold, String> {
    let bad = || format!("maxFailures: \"{text}\" is not a count (2) or a percentage (5%)");
    match text.trim().strip_suffix('%') {
        Some(p) => p
            .trim()
            .parse()
            .ok()
            .filter(|p| (1..=100).contains(p))
            .map(Threshold::Percent)
            .ok_or_else(bad),
        None => text
            .trim()
            .parse()
            .ok()
            .filter(|n| *n >= 1)
            .map(Threshold::Count)
            .ok_or_else(bad),
    }
}

/// Seconds, optionally with a unit: `600`, `90s`, `10m`, `2h`, `1d`.
pub fn parse_seconds(text: &str) -> Option<u64> {
    let text = text.trim();
    let (digits, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = digits.parse().ok()?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    n.checked_mul(mult)
}

fn names(text: &str) -> Result<Vec<String>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|n| {
            if crate::manager::store::valid_name(n) {
                Ok(n.to_string())
            } else {
                Err(format!("canary: \"{n}\" is not a node name"))
            }
        })
        .collect()
}

fn parse_label(text: &str, what: &str) -> Result<(String, String), String> {
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-/:".contains(&b))
    };
    match text.split_once('=') {
        Some((k, v)) if ok(k) && ok(v) => Ok((k.to_string(), v.to_string())),
        _ => Err(format!(
            "{what}: \"{text}\" is not KEY=VALUE (letters, digits, . _ - / :)"
        )),
    }
}

/// Whether `labels` has every pair of `want`.
pub(super) fn labels_match(labels: &[(String, String)], want: &[(String, String)]) -> bool {
    want.iter().all(|w| labels.contains(w))
}

impl Threshold {
    /// `2` or `5%`.
    pub fn text(&self) -> String {
        match self {
            Threshold::Count(n) => n.to_string(),
            Threshold::Percent(p) => format!("{p}%"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(q: &str) -> Policy {
        Policy::from_query(&pairs(q)).unwrap().unwrap()
    }

    fn pairs(q: &str) -> Vec<(String, String)> {
        q.split('&')
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap();
                (k.to_string(), v.to_string())
            })
            .collect()
    }

    const T0: u64 = 1_795_507_200; // 2026-11-24T08:00:00Z, a Tuesday

    #[test]
    fn policies_from_the_query_and_the_config() {
        let p = policy("rollout=1,10,50,100&soak=10m&maxFailures=5%&canary=n1,n2&canaryLabel=group=canary&match=region=eu&window=mon-fri@02-05");
        assert_eq!(p.steps, [1, 10, 50, 100]);
        assert_eq!(
            (p.soak_seconds, p.max_failures),
            (600, Threshold::Percent(5))
        );
        assert_eq!(p.canary, ["n1", "n2"]);
        assert_eq!(p.canary_labels, [("group".into(), "canary".into())]);
        assert_eq!(p.selector, [("region".into(), "eu".into())]);
        assert_eq!(p.window.unwrap().text(), "mon,tue,wed,thu,fri@02-05");
        assert_eq!(policy("rollout=100").max_failures, Threshold::Count(1));
        assert_eq!(policy("rollout=100").soak_seconds, DEFAULT_SOAK);
        assert_eq!(Policy::from_query(&[("soak".into(), "5".into())]), Ok(None));
        for (q, err) in [
            ("rollout=10,5,100", "must increase"),
            ("rollout=10,50", "must end with 100"),
            ("rollout=0,100", "not a percentage"),
            ("rollout=x", "not a percentage"),
            ("rollout=100&maxFailures=0", "maxFailures"),
            ("rollout=100&maxFailures=101%", "maxFailures"),
            ("rollout=100&soak=5y", "soak"),
            ("rollout=100&canary=../x", "not a node name"),
            ("rollout=100&match=region", "KEY=VALUE"),
            ("rollout=100&window=noon", "window"),
        ] {
            let pairs: Vec<(String, String)> = q
                .split('&')
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap();
                    (k.to_string(), v.to_string())
                })
                .collect();
            let e = Policy::from_query(&pairs).unwrap_err();
            assert!(e.contains(err), "{q}: {e}");
        }
        let j = crate::json::parse(r#"{"steps":[5,100],"soakSeconds":60,"maxFailures":2,"canary":["n1"],"canaryLabels":{"group":"canary"},"match":{"dc":"fra1"},"window":"*@22-04"}"#).unwrap();
        let p = Policy::from_json(&j).unwrap();
        assert_eq!(
            (p.steps.as_slice(), p.soak_seconds, p.max_failures),
            (&[5u8, 100][..], 60, Threshold::Count(2))
        );
        assert_eq!(p.window.unwrap().text(), "*@22-04");
        let e = Policy::from_json(&crate::json::parse(r#"{"steps":[100],"soak":1}"#).unwrap())
            .unwrap_err();
        assert!(e.contains("unknown key \"soak\""), "{e}");
        assert!(Policy::from_json(&crate::json::parse("{}").unwrap())
            .unwrap_err()
            .contains("\"steps\" is missing"));
    }

    #[test]
    fn windows() {
        let w = Window::parse("mon-fri@02-05").unwrap();
        let at = |day: u64, hour: u64| T0 - 8 * 3600 + day * 86_400 + hour * 3600; // T0's day at HH:00
        assert!(w.contains(at(0, 2)) && w.contains(at(0, 4)));
        assert!(!w.contains(at(0, 5)) && !w.contains(at(0, 1)));
        assert!(!w.contains(at(4, 3)), "Saturday");
        let night = Window::parse("sat@22-04").unwrap();
        assert!(night.contains(at(4, 23)), "Saturday 23:00");
        assert!(
            night.contains(at(5, 3)),
            "Sunday 03:00 belongs to Saturday's window"
        );
        assert!(!night.contains(at(5, 23)) && !night.contains(at(4, 21)));
        assert_eq!(
            Window::parse("fri-mon@00-24").unwrap().text(),
            "mon,fri,sat,sun@00-24"
        );
        assert!(Window::parse("mon@05-05").is_err());
        assert!(Window::parse("funday@01-02").is_err());
        // The end hour is exclusive on the morning after, too.
        assert!(!night.contains(at(5, 4)), "Sunday 04:00");
        // A window may start at 23:00, not at 24:00.
        assert_eq!(Window::parse("*@23-01").unwrap().text(), "*@23-01");
        assert!(Window::parse("*@24-02").is_err());
    }

    #[test]
    fn soak_units_labels_and_canaries() {
        for (text, secs) in [
            ("600", Some(600)),
            ("90s", Some(90)),
            ("10m", Some(600)),
            ("2h", Some(7200)),
            ("1d", Some(86_400)),
            (" 5m ", Some(300)),
            ("", None),
            ("m", None),
            ("5y", None),
            ("1.5h", None),
            ("99999999999999999d", None),
        ] {
            assert_eq!(parse_seconds(text), secs, "{text:?}");
        }
        // A label's key and value must both be words; either one bad is refused.
        for bad in ["re gion=eu", "region=e u", "=eu", "region=", "region"] {
            let q = format!("rollout=100&match={bad}");
            let e = Policy::from_query(&pairs(&q)).unwrap_err();
            assert!(e.contains("is not KEY=VALUE"), "{bad}: {e}");
        }
        assert!(
            Policy::from_query(&pairs(&format!("rollout=100&match=k={}", "v".repeat(129))))
                .is_err()
        );
        assert_eq!(
            policy(&format!("rollout=100&match=k={}", "v".repeat(128))).selector[0]
                .1
                .len(),
            128
        );
        // Canaries by name or by label add a phase before the steps.
        let by = |q: &str| {
            let p = policy(q);
            (p.has_canaries(), p.phases())
        };
        assert_eq!(by("rollout=10,100"), (false, 2));
        assert_eq!(by("rollout=10,100&canary=n1"), (true, 3));
        assert_eq!(by("rollout=10,100&canaryLabel=g=c"), (true, 3));
        assert_eq!(by("rollout=100"), (false, 1));
    }
}
