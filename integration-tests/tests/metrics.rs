//! The supervisor's Prometheus endpoint, scraped while the demo is under load: the
//! counters add up to what the load generator sent, per-worker gauges and restart reasons
//! appear, the live-connections gauge follows clients as they come and go, and `/healthz`
//! reports readiness.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use coreloop_integration_tests::{
    Server, ServerConfig, connect, get, kill, read_response, start_with_metrics, wait_for_metrics,
};
use rustix::process::Signal;

/// Sums of every sample of each metric name in an OpenMetrics text (labels dropped).
fn totals(text: &str) -> BTreeMap<String, f64> {
    let mut totals = BTreeMap::new();
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let name = series.split('{').next().unwrap_or(series).to_owned();
        if let Ok(value) = value.parse::<f64>() {
            *totals.entry(name).or_insert(0.0) += value;
        }
    }
    totals
}

/// The text and the per-name totals of one scrape.
fn scrape(port: u16) -> Result<(String, BTreeMap<String, f64>)> {
    let body = coreloop_integration_tests::scrape(port)?;
    let totals = totals(&body);
    Ok((body, totals))
}

/// Starts the demo with 2 workers and metrics on a random port.
fn start() -> Result<(Server, u16)> {
    start_with_metrics(&ServerConfig::new(2))
}

#[test]
fn counters_add_up_to_what_the_load_sent() -> Result<()> {
    let (server, metrics_port) = start()?;
    let (_, before) = scrape(metrics_port)?;
    let value =
        |totals: &BTreeMap<String, f64>, name: &str| totals.get(name).copied().unwrap_or(0.0);

    // Connection-per-request load from 4 threads.
    const PER_THREAD: usize = 100;
    let port = server.port();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || -> Result<usize> {
                let mut ok = 0;
                for _ in 0..PER_THREAD {
                    if get(port, "/")?.0 == 200 {
                        ok += 1;
                    }
                }
                Ok(ok)
            })
        })
        .collect();
    // Scrape while the load runs: the endpoint answers under load.
    let (_, during) = scrape(metrics_port)?;
    ensure!(
        value(&during, "coreloop_workers_ready") == 2.0,
        "{during:?}"
    );
    let mut sent = 0;
    for thread in threads {
        sent += thread
            .join()
            .map_err(|_| anyhow::anyhow!("client panicked"))??;
    }
    ensure!(sent == 4 * PER_THREAD, "only {sent} requests succeeded");

    let (text, after) = scrape(metrics_port)?;
    let delta = |name: &str| value(&after, name) - value(&before, name);
    ensure!(
        delta("coreloop_accepted_total") == sent as f64,
        "accepted {} for {sent}\n{text}",
        delta("coreloop_accepted_total")
    );
    ensure!(
        delta("coreloop_forwarded_total") == sent as f64,
        "forwarded {} for {sent}\n{text}",
        delta("coreloop_forwarded_total")
    );
    ensure!(
        delta("coreloop_dispatch_latency_seconds_count") == sent as f64,
        "latency samples {}\n{text}",
        delta("coreloop_dispatch_latency_seconds_count")
    );
    ensure!(
        value(&after, "coreloop_accept_errors_total") == 0.0,
        "{text}"
    );
    // Both workers took a share, each one's series is labelled by its slot.
    for worker in ["0", "1"] {
        let line = text
            .lines()
            .find(|line| {
                line.starts_with(&format!("coreloop_forwarded_total{{worker=\"{worker}\"}}"))
            })
            .with_context(|| format!("no forwarded series for worker {worker}\n{text}"))?;
        let count: f64 = line.rsplit(' ').next().unwrap_or("0").parse()?;
        ensure!(count > 0.0, "{line}");
    }
    ensure!(
        value(&after, "coreloop_worker_resident_bytes") > 0.0,
        "{text}"
    );
    ensure!(
        text.contains("coreloop_worker_heartbeat_lag_seconds{worker=\"0\"}"),
        "{text}"
    );
    ensure!(get(metrics_port, "/healthz")? == (200, "ok\n".to_owned()));
    ensure!(get(metrics_port, "/nope")?.0 == 404);
    Ok(())
}

/// The live-connections gauge counts connections as workers open and close them (each
/// worker publishes its count in shared memory), not as of its last report, which comes
/// once per heartbeat interval (1 s here).
#[test]
fn the_live_gauge_follows_connections_as_they_open_and_close() -> Result<()> {
    let (server, metrics_port) = start()?;
    let live_in = |text: &str| {
        totals(text)
            .get("coreloop_worker_live_connections")
            .copied()
            .unwrap_or(0.0)
    };
    let live =
        || -> Result<f64> { Ok(live_in(&coreloop_integration_tests::scrape(metrics_port)?)) };
    ensure!(live()? == 0.0, "live connections before any client");
    // Five keep-alive connections, each answered, so that a worker holds each.
    let mut held = Vec::new();
    for _ in 0..5 {
        let mut stream = connect(server.port())?;
        stream.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")?;
        let response = read_response(&mut stream)?;
        ensure!(response.status == 200, "status {}", response.status);
        held.push(stream);
    }
    let open = live()?;
    ensure!(
        open == 5.0,
        "the gauge shows {open} live connections, not 5"
    );
    // A worker closes its side once it reads the client's end.
    drop(held);
    wait_for_metrics(
        metrics_port,
        "0 live connections",
        Duration::from_secs(10),
        |text| live_in(text) == 0.0,
    )
}

#[test]
fn a_crashed_worker_is_counted_with_its_reason() -> Result<()> {
    let (server, metrics_port) = start()?;
    let victim = *server.worker_pids().get(&0).context("no worker 0")?;
    let mark = server.log_mark();
    kill(victim, Signal::KILL)?;
    server
        .wait_for_replacement(mark, 0, victim, Duration::from_secs(10))
        .context("worker 0 was not replaced")?;
    let (text, _) = scrape(metrics_port)?;
    ensure!(
        text.contains("coreloop_worker_restarts_total{worker=\"0\",reason=\"crash\"} 1"),
        "{text}"
    );
    Ok(())
}

/// The accept loop's polling shows in `coreloop_accept_poll_interval_seconds`: 0 while the
/// server is idle, the interval (250 µs, up to 1 ms while the CPUs are saturated) while a
/// connection-per-request load makes the supervisor poll its listeners, and 0 again once
/// the load has stopped.
#[test]
fn the_poll_interval_gauge_follows_the_load() -> Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;

    const NAME: &str = "coreloop_accept_poll_interval_seconds";
    let (server, metrics_port) = start()?;
    let interval = |totals: &BTreeMap<String, f64>| totals.get(NAME).copied();
    let (_, idle) = scrape(metrics_port)?;
    ensure!(interval(&idle) == Some(0.0), "idle: {:?}", interval(&idle));

    let stop = Arc::new(AtomicBool::new(false));
    let port = server.port();
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || -> Result<usize> {
                let mut answered = 0;
                while !stop.load(Ordering::Relaxed) {
                    ensure!(get(port, "/")?.0 == 200, "a request failed");
                    answered += 1;
                }
                Ok(answered)
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let polling = loop {
        let (_, now) = scrape(metrics_port)?;
        match interval(&now) {
            Some(value) if value > 0.0 => break value,
            Some(_) if Instant::now() < deadline => {}
            other => anyhow::bail!("the supervisor never polled under load: {NAME} = {other:?}"),
        }
    };
    stop.store(true, Ordering::Relaxed);
    let mut answered = 0;
    for client in clients {
        answered += client.join().expect("client thread")?;
    }
    ensure!(
        (0.000_25..=0.001).contains(&polling),
        "polling every {polling} s after {answered} requests"
    );

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, after) = scrape(metrics_port)?;
        match interval(&after) {
            Some(0.0) => break,
            Some(_) if Instant::now() < deadline => {}
            other => anyhow::bail!("still polling with no load: {NAME} = {other:?}"),
        }
    }
    Ok(())
}
