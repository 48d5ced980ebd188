//! Benchmark results: latency histogram, throughput and errors, as text or JSON.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;

pub struct Outcome {
    pub latency_us: Histogram<u64>,
    pub elapsed: Duration,
    pub errors: BTreeMap<String, u64>,
}

pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds are valid")
}

impl Outcome {
    pub fn new() -> Outcome {
        Outcome {
            latency_us: histogram(),
            elapsed: Duration::ZERO,
            errors: BTreeMap::new(),
        }
    }

    pub fn merge(&mut self, other: &Outcome) {
        self.latency_us
            .add(&other.latency_us)
            .expect("histograms share bounds");
        for (k, v) in &other.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
    }

    pub fn record_error(&mut self, status: &tonic::Status) {
        *self
            .errors
            .entry(format!("{:?}: {}", status.code(), status.message()))
            .or_default() += 1;
    }

    fn ms(&self, q: f64) -> f64 {
        self.latency_us.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn print(&self, name: &str, json: bool) {
        let ok = self.latency_us.len();
        let failed: u64 = self.errors.values().sum();
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        // A run with failures reports no throughput: the number would not mean anything.
        let rps = if failed == 0 {
            Some(ok as f64 / secs)
        } else {
            None
        };
        if json {
            let v = serde_json::json!({
                "benchmark": name,
                "total": ok,
                "failed": failed,
                "seconds": secs,
                "requests_per_second": rps,
                "latency_ms": {
                    "min": self.latency_us.min() as f64 / 1000.0,
                    "p50": self.ms(0.5), "p90": self.ms(0.9), "p99": self.ms(0.99),
                    "p99.9": self.ms(0.999),
                    "max": self.latency_us.max() as f64 / 1000.0,
                    "mean": self.latency_us.mean() / 1000.0,
                },
                "errors": self.errors,
            });
            println!("{v}");
            return;
        }
        println!("Summary ({name}):");
        println!("  Total:        {ok} ok, {failed} failed, {secs:.3} s");
        match rps {
            Some(r) => println!("  Requests/sec: {r:.1}"),
            None => println!("  Requests/sec: not reported (requests failed)"),
        }
        if ok > 0 {
            println!(
                "  Latency (ms): min {:.3}  p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
                self.latency_us.min() as f64 / 1000.0,
                self.ms(0.5),
                self.ms(0.9),
                self.ms(0.99),
                self.ms(0.999),
                self.latency_us.max() as f64 / 1000.0
            );
        }
        for (kind, n) in &self.errors {
            println!("  Error x{n}: {kind}");
        }
    }
}
