//! The `queueDepth` and `costAware` policies' total: how many replicas the requests waiting on
//! an InferenceDeployment's engines call for. Each ready engine pod's `/metrics` is read for
//! `sparsemoe_num_requests_waiting`; the sum over pods, divided by
//! `scaling.targetQueueDepthPerReplica` and rounded up, is the recommendation (what an HPA
//! computes for an `AverageValue` target), clamped to `[minReplicas, maxReplicas]` and
//! stabilized as the HPA stabilizes: a scale-up takes the lowest recommendation of the last
//! `scaleUpStabilizationSeconds`, a scale-down the highest of the last
//! `scaleDownStabilizationSeconds`, so a burst or a lull shorter than the window moves nothing.
//!
//! Pods whose metrics cannot be read count neither way, but while any ready pod's cannot, no
//! replica is taken away: the unread pods may be the busy ones. With none read at all there is
//! no recommendation, and the replicas that run are held.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use sparsemoe_api::v1alpha1::ScalingSpec;
use tokio::time::Instant;

/// The engine's gauges of requests waiting for a slot, of requests running, and of the
/// running batch's slots (`--max-running`).
pub const WAITING_METRIC: &str = "sparsemoe_num_requests_waiting";
pub const RUNNING_METRIC: &str = "sparsemoe_num_requests_running";
pub const SLOTS_METRIC: &str = "sparsemoe_max_running_requests";
/// How often an InferenceDeployment under `queueDepth` or `costAware` is looked at again (its
/// engines read).
pub const SCRAPE_EVERY: Duration = Duration::from_secs(15);
/// How long one engine's `/metrics` may take before it counts as unreadable.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// The most bytes of one engine's `/metrics` read.
const MAX_METRICS_BYTES: usize = 4 << 20;

/// Reads a URL's body, or says why it could not.
pub trait Scrape: Send + Sync + std::fmt::Debug {
    fn get(&self, url: String) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send>>;
}

/// [`Scrape`] over plain HTTP/1, each read bounded by [`SCRAPE_TIMEOUT`].
#[derive(Clone, Debug)]
pub struct HttpScrape {
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Empty<bytes::Bytes>,
    >,
}

impl Default for HttpScrape {
    fn default() -> Self {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_connect_timeout(Some(SCRAPE_TIMEOUT));
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(connector);
        Self { client }
    }
}

impl Scrape for HttpScrape {
    fn get(&self, url: String) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send>> {
        let client = self.client.clone();
        Box::pin(async move {
            use http_body_util::BodyExt as _;
            let read = async {
                let uri: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
                let response = client.get(uri).await.map_err(|e| format!("{url}: {e}"))?;
                if !response.status().is_success() {
                    return Err(format!("{url}: HTTP {}", response.status()));
                }
                let body = http_body_util::Limited::new(response.into_body(), MAX_METRICS_BYTES)
                    .collect()
                    .await
                    .map_err(|e| format!("{url}: {e}"))?
                    .to_bytes();
                String::from_utf8(body.to_vec()).map_err(|_| format!("{url}: not UTF-8"))
            };
            tokio::time::timeout(SCRAPE_TIMEOUT, read)
                .await
                .unwrap_or_else(|_| Err(format!("{url}: no answer in {SCRAPE_TIMEOUT:?}")))
        })
    }
}

/// The sum of every sample of `metric` in a Prometheus text exposition, or `None` when it has
/// none. Labels are skipped whole, quoted values and their escapes included.
pub fn metric_sum(text: &str, metric: &str) -> Result<Option<f64>, String> {
    let mut sum = None;
    for line in text.lines() {
        let line = line.trim_start();
        let Some(rest) = line.strip_prefix(metric) else {
            continue;
        };
        let rest = match rest.chars().next() {
            Some('{') => skip_labels(rest).ok_or_else(|| format!("unclosed labels: {line}"))?,
            Some(c) if c.is_whitespace() => rest,
            _ => continue, // another metric whose name starts with this one's
        };
        let value = rest
            .split_whitespace()
            .next()
            .ok_or_else(|| format!("no value: {line}"))?;
        let value: f64 = value.parse().map_err(|_| format!("not a number: {line}"))?;
        *sum.get_or_insert(0.0) += value;
    }
    Ok(sum)
}

/// What follows a sample's `{labels}` (`text` starts with the `{`).
fn skip_labels(text: &str) -> Option<&str> {
    let (mut quoted, mut escaped) = (false, false);
    for (i, c) in text.char_indices() {
        match (quoted, escaped, c) {
            (true, true, _) => escaped = false,
            (true, false, '\\') => escaped = true,
            (_, false, '"') => quoted = !quoted,
            (false, _, '}') => return Some(&text[i + 1..]),
            _ => {}
        }
    }
    None
}

/// What the ready engine pods of one InferenceDeployment say.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueueObservation {
    /// Requests waiting, summed over the pods read.
    pub waiting: f64,
    /// Requests running, summed over the pods read.
    pub running: f64,
    /// The running batches' slots (`sparsemoe_max_running_requests`), summed over the pods
    /// read that say, and how many said.
    pub slots: f64,
    pub slotted: u32,
    /// Pods read.
    pub read: u32,
    /// Ready pods that could not be read, each with why.
    pub unread: Vec<String>,
    /// Each pod read, for its throughput ([`crate::cost`]).
    pub engines: Vec<crate::cost::EngineRead>,
}

/// The recommendations of the longest stabilization window, oldest first, in buckets of
/// [`SCRAPE_EVERY`] (a reconcile an event brings between reads adds to the newest), so the
/// history of a window of a day holds a few thousand entries, not one per reconcile.
#[derive(Clone, Debug, Default)]
pub struct Recommendations(VecDeque<Bucket>);

#[derive(Clone, Copy, Debug)]
struct Bucket {
    first: Instant,
    last: Instant,
    lowest: i64,
    highest: i64,
}

impl Recommendations {
    fn note(&mut self, now: Instant, replicas: i64) {
        match self.0.back_mut() {
            Some(b) if now.saturating_duration_since(b.first) < SCRAPE_EVERY => {
                b.last = now;
                b.lowest = b.lowest.min(replicas);
                b.highest = b.highest.max(replicas);
            }
            _ => self.0.push_back(Bucket {
                first: now,
                last: now,
                lowest: replicas,
                highest: replicas,
            }),
        }
    }

    /// The buckets with a recommendation within `window` of `now`.
    fn within(&self, now: Instant, window: Duration) -> impl Iterator<Item = &Bucket> {
        self.0
            .iter()
            .filter(move |b| now.saturating_duration_since(b.last) <= window)
    }

    fn forget_before(&mut self, now: Instant, window: Duration) {
        self.0
            .retain(|b| now.saturating_duration_since(b.last) <= window);
    }
}

/// The replicas the queue calls for, and why in words (the ScalingActive condition's message,
/// which names no live count, so a settled object's status does not change with its load).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recommendation {
    pub replicas: i64,
    pub reason: String,
}

/// HPA's tolerance: a queue within 10% of the target per replica changes nothing.
const TOLERANCE: f64 = 0.1;

/// The replicas `scaling` calls for when `current` run and `seen` was read at `now`, adding
/// this recommendation to `history`; `Err` with why there is none (no pod could be read).
///
/// The waiting requests call for `ceil(waiting / target)`; the running ones for as many
/// replicas as keep each in a slot (`ceil(running / slots per engine)`), so a queue that
/// empties because the batches took it in does not take away the replicas running it. What
/// runs is the first recommendation of an empty history (a new object, or a restarted
/// operator), and while nothing can be read, so a scale-down waits a whole window then too.
pub fn recommend(
    scaling: &ScalingSpec,
    current: i64,
    seen: &QueueObservation,
    history: &mut Recommendations,
    now: Instant,
) -> Result<Recommendation, String> {
    let min = i64::from(scaling.min_replicas);
    let max = i64::from(scaling.max_replicas.unwrap_or(scaling.min_replicas)).max(min);
    let up = Duration::from_secs(scaling.scale_up_stabilization_seconds.into());
    let down = Duration::from_secs(scaling.scale_down_stabilization_seconds.into());
    history.forget_before(now, up.max(down));
    let holding = current.clamp(min, max);
    if history.0.is_empty() || seen.read == 0 {
        history.note(now, holding);
    }
    if seen.read == 0 {
        return Err(match seen.unread.len() {
            0 => "no engine pod is ready to read metrics from".into(),
            n => format!(
                "no ready engine pod's metrics could be read ({n} tried; the operator's log \
                 says why)"
            ),
        });
    }
    let target = f64::from(scaling.target_queue_depth_per_replica.max(1));
    let waiting = seen.waiting.max(0.0);
    let mut wanted = (waiting / target).ceil() as i64;
    if current > 0 && ((waiting / (current as f64 * target)) - 1.0).abs() <= TOLERANCE {
        wanted = current;
    }
    if seen.slotted > 0 && seen.slots > 0.0 {
        let per_engine = seen.slots / f64::from(seen.slotted);
        wanted = wanted.max((seen.running.max(0.0) / per_engine).ceil() as i64);
    }
    let wanted = wanted.clamp(min, max);
    history.note(now, wanted);
    let lowest_lately = match up.is_zero() {
        true => wanted,
        false => history
            .within(now, up)
            .map(|b| b.lowest)
            .min()
            .unwrap_or(wanted),
    };
    let highest_lately = match down.is_zero() {
        true => wanted,
        false => history
            .within(now, down)
            .map(|b| b.highest)
            .max()
            .unwrap_or(wanted),
    };
    let mut replicas = if current < lowest_lately {
        lowest_lately
    } else if current > highest_lately {
        highest_lately
    } else {
        holding
    };
    let policy = scaling.policy.as_str();
    let mut reason = format!(
        "policy {policy}: {wanted} replica(s) for the requests waiting ({} per replica \
         wanted) and running",
        scaling.target_queue_depth_per_replica
    );
    if replicas != wanted {
        let (window, seconds) = match replicas > wanted {
            true => ("scaleDownStabilizationSeconds", down.as_secs()),
            false => ("scaleUpStabilizationSeconds", up.as_secs()),
        };
        reason.push_str(&format!(
            "; {replicas} for now, within the recommendations of the last {seconds} s \
             ({window})"
        ));
    }
    if !seen.unread.is_empty() && replicas < holding {
        // The unread pods may be the busy ones: nothing comes off on what was read.
        replicas = holding;
        reason.push_str(&format!(
            "; none taken away while {} ready engine(s) cannot be read (the operator's log \
             says why)",
            seen.unread.len()
        ));
    }
    Ok(Recommendation { replicas, reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As the engine writes it (`sparsemoe-engine`'s registry), and with what else an
    /// exposition may hold: labels with quotes, braces and escapes, timestamps, other metrics
    /// whose names start with this one's.
    #[test]
    fn waiting_requests_are_summed_over_samples() {
        let text = "# HELP sparsemoe_num_requests_waiting Requests waiting for a slot\n\
            # TYPE sparsemoe_num_requests_waiting gauge\n\
            sparsemoe_num_requests_waiting 7\n\
            sparsemoe_num_requests_waiting_total 100\n\
            sparsemoe_num_requests_waiting{model=\"a \\\"b} c\",x=\"\\\\\"} 2.5 1700000000000\n\
            sparsemoe_num_requests_running 3\n";
        assert_eq!(metric_sum(text, WAITING_METRIC), Ok(Some(9.5)));
        assert_eq!(
            metric_sum(text, "sparsemoe_num_requests_running"),
            Ok(Some(3.0))
        );
        assert_eq!(metric_sum("up 1\n", WAITING_METRIC), Ok(None));
        for bad in [
            "sparsemoe_num_requests_waiting{model=\"a\" 1\n",
            "sparsemoe_num_requests_waiting many\n",
            "sparsemoe_num_requests_waiting\t\n",
        ] {
            assert!(metric_sum(bad, WAITING_METRIC).is_err(), "{bad:?}");
        }
    }

    fn scaling(min: u32, max: u32, target: u32) -> ScalingSpec {
        ScalingSpec {
            policy: sparsemoe_api::v1alpha1::ScalingPolicy::QueueDepth,
            min_replicas: min,
            max_replicas: Some(max),
            target_queue_depth_per_replica: target,
            scale_up_stabilization_seconds: 0,
            scale_down_stabilization_seconds: 300,
            ..ScalingSpec::default()
        }
    }

    fn seen(waiting: f64, read: u32) -> QueueObservation {
        QueueObservation {
            waiting,
            read,
            ..QueueObservation::default()
        }
    }

    #[test]
    fn a_queue_scales_up_at_once_and_down_after_the_window() {
        let s = scaling(1, 8, 4);
        let mut history = Recommendations::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        // 17 waiting over 2 replicas, 4 per replica wanted: 5 replicas, at once.
        let r = recommend(&s, 2, &seen(17.0, 2), &mut history, at(0)).unwrap();
        assert_eq!(r.replicas, 5, "{}", r.reason);
        assert!(
            r.reason.starts_with("policy queueDepth: 5 replica(s)"),
            "{}",
            r.reason
        );
        // Past maxReplicas: clamped.
        let r = recommend(&s, 5, &seen(400.0, 5), &mut history, at(15)).unwrap();
        assert_eq!(r.replicas, 8);
        // The queue empties: held at 8 for the 300 s window after the last high mark.
        for t in [30, 100, 314] {
            let r = recommend(&s, 8, &seen(0.0, 8), &mut history, at(t)).unwrap();
            assert_eq!(r.replicas, 8, "at {t} s: {}", r.reason);
            assert!(
                r.reason.contains("scaleDownStabilizationSeconds"),
                "{}",
                r.reason
            );
        }
        // Past it (the 8 of 15 s has left the window), the highest recommendation left: 1.
        let r = recommend(&s, 8, &seen(0.0, 8), &mut history, at(316)).unwrap();
        assert_eq!(r.replicas, 1, "{}", r.reason);
        // minReplicas holds with nothing waiting.
        let r = recommend(&scaling(2, 8, 4), 1, &seen(0.0, 1), &mut history, at(400)).unwrap();
        assert_eq!(r.replicas, 2);
    }

    #[test]
    fn a_scale_up_window_takes_the_lowest_recommendation() {
        let mut s = scaling(1, 10, 1);
        s.scale_up_stabilization_seconds = 60;
        let mut history = Recommendations::default();
        let t0 = Instant::now();
        let r = recommend(&s, 1, &seen(1.0, 1), &mut history, t0).unwrap();
        assert_eq!(r.replicas, 1);
        // A burst: 6 waiting, but 1 was recommended within the last 60 s.
        let r = recommend(
            &s,
            1,
            &seen(6.0, 1),
            &mut history,
            t0 + Duration::from_secs(30),
        );
        assert_eq!(r.unwrap().replicas, 1);
        // Held for the whole window: the lowest since is 6.
        let r = recommend(
            &s,
            1,
            &seen(8.0, 1),
            &mut history,
            t0 + Duration::from_secs(61),
        );
        let r = r.unwrap();
        assert_eq!(r.replicas, 6, "{}", r.reason);
        assert!(
            r.reason.contains("scaleUpStabilizationSeconds"),
            "{}",
            r.reason
        );
    }

    #[test]
    fn unread_engines_stop_scale_downs_and_none_read_gives_no_recommendation() {
        let s = scaling(1, 8, 4);
        let mut history = Recommendations::default();
        let now = Instant::now();
        let partial = QueueObservation {
            waiting: 0.0,
            read: 2,
            unread: vec!["pod a: connection refused".into()],
            ..QueueObservation::default()
        };
        let mut no_window = s.clone();
        no_window.scale_down_stabilization_seconds = 0;
        let r = recommend(&no_window, 3, &partial, &mut history, now).unwrap();
        assert_eq!(r.replicas, 3, "{}", r.reason);
        assert!(
            r.reason.contains("1 ready engine(s) cannot be read"),
            "{}",
            r.reason
        );
        // A scale-up still happens on what was read.
        let busy = QueueObservation {
            waiting: 20.0,
            ..partial.clone()
        };
        let later = now + Duration::from_secs(1);
        let r = recommend(&no_window, 3, &busy, &mut history, later).unwrap();
        assert_eq!(r.replicas, 5);
        let none = QueueObservation {
            unread: vec!["pod a: timed out".into(), "pod b: timed out".into()],
            ..QueueObservation::default()
        };
        let why = recommend(&s, 3, &none, &mut history, now).unwrap_err();
        // No pod's words: a message that changed with them would rewrite the status.
        assert!(
            why.contains("2 tried") && !why.contains("timed out"),
            "{why}"
        );
        let why = recommend(&s, 3, &seen(0.0, 0), &mut history, now).unwrap_err();
        assert!(why.contains("no engine pod is ready"), "{why}");
    }

    /// Running requests keep their slots: a queue the batches took in does not take away the
    /// replicas running it (4 engines of 64 slots running 30 each need 2, not 1).
    #[test]
    fn the_running_requests_keep_their_slots() {
        let mut s = scaling(1, 8, 4);
        s.scale_down_stabilization_seconds = 0;
        let busy = |slotted: u32| QueueObservation {
            running: 120.0,
            slots: 64.0 * f64::from(slotted),
            slotted,
            read: 4,
            ..QueueObservation::default()
        };
        let now = Instant::now();
        let r = recommend(&s, 4, &busy(4), &mut Recommendations::default(), now).unwrap();
        assert_eq!(r.replicas, 2, "{}", r.reason);
        // Engines that do not say their slots: the waiting requests alone.
        let r = recommend(&s, 4, &busy(0), &mut Recommendations::default(), now).unwrap();
        assert_eq!(r.replicas, 1, "{}", r.reason);
    }

    /// A new history (a restarted operator) starts at what runs, so a scale-down waits a
    /// whole window; a queue within 10% of the target changes nothing (HPA's tolerance); one
    /// reconcile after another adds to the newest bucket, not an entry each.
    #[test]
    fn history_starts_at_what_runs_is_tolerant_and_bounded() {
        let s = scaling(1, 8, 4);
        let mut history = Recommendations::default();
        let t0 = Instant::now();
        let r = recommend(&s, 8, &seen(0.0, 8), &mut history, t0).unwrap();
        assert_eq!(r.replicas, 8, "{}", r.reason);
        // 8.5 waiting on 2 replicas at 4 each: 6% over, 2 stay (3 without the tolerance).
        let mut fresh = Recommendations::default();
        let r = recommend(&s, 2, &seen(8.5, 2), &mut fresh, t0).unwrap();
        assert_eq!(r.replicas, 2);
        let r = recommend(
            &s,
            2,
            &seen(9.0, 2),
            &mut fresh,
            t0 + Duration::from_secs(1),
        );
        assert_eq!(r.unwrap().replicas, 3);
        for i in 0..3000u64 {
            let now = t0 + Duration::from_secs(i);
            recommend(&s, 8, &seen(0.0, 8), &mut history, now).unwrap();
        }
        assert!(
            history.0.len() <= 300 / 15 + 2,
            "{} buckets",
            history.0.len()
        );
    }

    /// A real HTTP read: the body of a server's answer; a refused connection and an error
    /// status are errors that name the URL.
    #[tokio::test]
    async fn engines_are_read_over_http() {
        let app = axum::Router::new()
            .route(
                "/metrics",
                axum::routing::get(|| async { "sparsemoe_num_requests_waiting 3\n" }),
            )
            .route(
                "/broken",
                axum::routing::get(|| async { (http::StatusCode::INTERNAL_SERVER_ERROR, "no") }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let scrape = HttpScrape::default();
        let body = scrape.get(format!("http://{addr}/metrics")).await.unwrap();
        assert_eq!(metric_sum(&body, WAITING_METRIC), Ok(Some(3.0)));
        let err = scrape
            .get(format!("http://{addr}/broken"))
            .await
            .unwrap_err();
        assert!(err.contains("/broken") && err.contains("500"), "{err}");
        // Nothing listens on the port just freed.
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = free.local_addr().unwrap().port();
        drop(free);
        let err = scrape
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .await
            .unwrap_err();
        assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    }
}
