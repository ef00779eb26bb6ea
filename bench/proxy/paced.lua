-- wrk script for bench/proxy/run's equal-load rows: every connection waits PACE_MS
-- milliseconds between an answer and its next request, so every target is offered the same
-- load, and prints one line: "<req/s> <p50 us> <p99 us> <p99.9 us> <errors>".
local pace = tonumber(os.getenv("PACE_MS") or "10")

function delay()
    return pace
end

function done(summary, latency, requests)
    local seconds = summary.duration / 1e6
    local e = summary.errors
    io.write(string.format("paced %.0f %d %d %d %d\n", summary.requests / seconds,
        latency:percentile(50), latency:percentile(99), latency:percentile(99.9),
        e.read + e.write + e.timeout + e.status))
end
