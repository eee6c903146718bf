-- wrk script: at the end of a run, print one machine-readable line for bench/bench.py.
--   BENCH_JSON {"requests":..,"duration_us":..,"errors":..,"p50_us":..,...}
-- Latencies are wrk's per-request latencies in microseconds. "errors" adds every kind
-- wrk counts: connect, read, write, non-2xx/3xx status and timeout.

function done(summary, latency, requests)
   local e = summary.errors
   local errors = e.connect + e.read + e.write + e.status + e.timeout
   io.write(string.format(
      'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"errors":%d,' ..
      '"errors_connect":%d,"errors_read":%d,"errors_write":%d,"errors_status":%d,' ..
      '"errors_timeout":%d,"p50_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d,' ..
      '"mean_us":%.1f}\n',
      summary.requests, summary.duration, summary.bytes, errors,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(99), latency:percentile(99.9),
      latency.max, latency.mean))
end
