// Squall's live page: polls /api/history once a second and draws each panel as inline SVG.
// Self-contained on purpose (no libraries, nothing fetched from elsewhere), so it works on an
// air-gapped admin port and the Content-Security-Policy can forbid everything else.
// When the admin listener has a token (squall up --admin-token-file) and /api/history answers
// 401, the page stops polling and asks for it; the token is kept in this tab's sessionStorage
// and sent as `Authorization: Bearer` with every request.
"use strict";

(() => {
  const WIDTH = 600;
  const HEIGHT = 180;
  const PAD = { left: 58, right: 10, top: 8, bottom: 20 };
  const KEEP = 600;
  const POLL_MS = 1000;
  const TOKEN_KEY = "squall-admin-token";

  const count = (v) => (Number.isInteger(v) ? v.toFixed(0) : v.toFixed(1));
  const seconds = (v) => (v === 0 ? "0" : v >= 1 ? v.toFixed(2) + " s" : (v * 1000).toFixed(v < 0.01 ? 2 : 0) + " ms");
  const perSecond = (v) => (v >= 100 ? v.toFixed(0) : v.toFixed(1));

  // Each panel: the series it draws, each a key of a sample or a function of it.
  const PANELS = {
    workers: {
      format: count,
      floor: 1,
      series: [
        { name: "desired", color: "#6b7385", dashed: true },
        { name: "ready", color: "#2563eb" },
        { name: "pending", color: "#d97706" },
        { name: "draining", color: "#7c3aed" },
      ],
    },
    latency: {
      format: seconds,
      floor: 0.001,
      series: [
        { name: "p50", color: "#16a34a" },
        { name: "p95", color: "#2563eb" },
        { name: "p99", color: "#7c3aed" },
        { name: "slo", label: "SLO (p95)", color: "#dc2626", dashed: true, value: () => state.slo },
      ],
    },
    rate: {
      format: perSecond,
      floor: 1,
      series: [
        { name: "rate", label: "requests/s", color: "#2563eb" },
        { name: "errors", label: "5xx/s", color: "#dc2626", value: (s) => s.rate * s.error_rate },
      ],
    },
    queue: {
      format: count,
      floor: 1,
      series: [
        { name: "queue", label: "queued", color: "#d97706" },
        { name: "in_flight", label: "in flight", color: "#2563eb" },
      ],
    },
    clones: {
      format: seconds,
      floor: 0.001,
      series: [{ name: "clone_seconds", label: "mean per second", color: "#0891b2", dots: true }],
    },
  };

  const state = { samples: [], slo: null, policy: null, scaler: null };

  const valueOf = (series, sample) => {
    const v = series.value ? series.value(sample) : sample[series.name];
    return typeof v === "number" && Number.isFinite(v) ? v : null;
  };

  const niceMax = (max, floor) => {
    const m = Math.max(max * 1.15, floor);
    const step = Math.pow(10, Math.floor(Math.log10(m)));
    for (const k of [1, 2, 2.5, 5, 10]) {
      if (k * step >= m) return k * step;
    }
    return 10 * step;
  };

  function draw(id, panel) {
    const section = document.getElementById(id);
    const samples = state.samples;
    const last = samples[samples.length - 1];
    const t1 = last.t;
    const t0 = Math.min(samples[0].t, t1 - 30);
    const x = (t) => PAD.left + ((t - t0) / (t1 - t0)) * (WIDTH - PAD.left - PAD.right);
    let max = 0;
    for (const s of samples) {
      for (const series of panel.series) {
        const v = valueOf(series, s);
        if (v !== null && v > max) max = v;
      }
    }
    const top = niceMax(max, panel.floor);
    const y = (v) => HEIGHT - PAD.bottom - (v / top) * (HEIGHT - PAD.top - PAD.bottom);

    const parts = [];
    // Panic mode as shaded spans behind everything.
    for (let i = 0; i < samples.length; i++) {
      if (!samples[i].panic) continue;
      const end = i + 1 < samples.length ? samples[i + 1].t : samples[i].t + 1;
      parts.push(`<rect class="panic" x="${x(samples[i].t).toFixed(1)}" y="${PAD.top}" width="${Math.max(1, x(end) - x(samples[i].t)).toFixed(1)}" height="${HEIGHT - PAD.top - PAD.bottom}"></rect>`);
    }
    for (const f of [0, 0.5, 1]) {
      const gy = y(top * f).toFixed(1);
      parts.push(`<line class="grid" x1="${PAD.left}" x2="${WIDTH - PAD.right}" y1="${gy}" y2="${gy}"></line>`);
      parts.push(`<text class="axis" x="${PAD.left - 6}" y="${gy}" text-anchor="end" dominant-baseline="middle">${panel.format(top * f)}</text>`);
    }
    parts.push(`<text class="axis" x="${PAD.left}" y="${HEIGHT - 4}">-${Math.round(t1 - t0)} s</text>`);
    parts.push(`<text class="axis" x="${WIDTH - PAD.right}" y="${HEIGHT - 4}" text-anchor="end">now</text>`);

    const legend = [];
    for (const series of panel.series) {
      const dash = series.dashed ? " dashed" : "";
      let d = "";
      let pen = "M";
      let points = 0;
      let latest = null;
      for (const s of samples) {
        const v = valueOf(series, s);
        if (v === null) {
          pen = "M";
          continue;
        }
        latest = v;
        points++;
        if (series.dots) {
          parts.push(`<circle class="dot" data-series="${series.name}" cx="${x(s.t).toFixed(1)}" cy="${y(v).toFixed(1)}" r="3" fill="${series.color}"></circle>`);
        }
        d += `${pen}${x(s.t).toFixed(1)},${y(v).toFixed(1)} `;
        pen = "L";
      }
      if (!series.dots) {
        parts.push(`<path class="series${dash}" data-series="${series.name}" data-points="${points}" stroke="${series.color}" d="${d.trim()}"></path>`);
      }
      const shown = latest === null ? "–" : panel.format(latest);
      legend.push(`<span><svg class="key" width="14" height="4" aria-hidden="true"><rect width="14" height="4" fill="${series.color}"></rect></svg>${series.label || series.name} <span class="value" data-series="${series.name}">${shown}</span></span>`);
    }
    section.querySelector(".chart").innerHTML =
      `<svg viewBox="0 0 ${WIDTH} ${HEIGHT}" preserveAspectRatio="none" role="img" aria-label="${id}">${parts.join("")}</svg>`;
    section.querySelector(".legend").innerHTML = legend.join("");
  }

  function render() {
    if (state.samples.length === 0) return;
    for (const [id, panel] of Object.entries(PANELS)) draw(id, panel);
    const last = state.samples[state.samples.length - 1];
    const mode = document.getElementById("mode");
    mode.textContent = last.panic ? "panic" : "calm";
    mode.className = "mode " + (last.panic ? "panic" : "calm");
    if (state.scaler && state.scaler.reason) {
      document.getElementById("reason").textContent = "Last decision: " + state.scaler.reason;
    }
    document.body.dataset.samples = String(state.samples.length);
    document.body.dataset.updated = String(last.t);
  }

  // sessionStorage can be unavailable (storage disabled); the page then asks on each load.
  const token = {
    get() {
      try {
        return sessionStorage.getItem(TOKEN_KEY);
      } catch (e) {
        return token.kept;
      }
    },
    set(value) {
      token.kept = value;
      try {
        if (value === null) sessionStorage.removeItem(TOKEN_KEY);
        else sessionStorage.setItem(TOKEN_KEY, value);
      } catch (e) {
        // Kept in memory only.
      }
    },
    kept: null,
  };
  let asking = false;

  // Stops polling and shows the token form; a token that was refused is forgotten.
  function askForToken(refused) {
    asking = true;
    if (refused) token.set(null);
    document.getElementById("error").hidden = true;
    document.getElementById("auth-note").textContent = refused ? "That token was refused." : "";
    document.getElementById("auth").hidden = false;
    if (state.samples.length === 0) {
      document.getElementById("reason").textContent = "waiting for the admin token";
    }
    document.body.dataset.auth = refused ? "refused" : "needed";
    document.getElementById("token").focus();
  }

  document.getElementById("auth").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = document.getElementById("token");
    const value = input.value.trim();
    if (!/^[\x21-\x7e]+$/.test(value)) {
      document.getElementById("auth-note").textContent = "A token is printable ASCII without spaces.";
      return;
    }
    token.set(value);
    input.value = "";
    document.getElementById("auth").hidden = true;
    if (state.samples.length === 0) {
      document.getElementById("reason").textContent = "waiting for the first sample";
    }
    document.body.dataset.auth = "given";
    if (asking) {
      asking = false;
      poll();
    }
  });

  async function poll() {
    const last = state.samples[state.samples.length - 1];
    const url = last ? `/api/history?since=${last.t}` : "/api/history";
    const error = document.getElementById("error");
    try {
      const sent = token.get();
      const headers = sent ? { Authorization: "Bearer " + sent } : {};
      const response = await fetch(url, { cache: "no-store", headers });
      if (response.status === 401) {
        askForToken(sent !== null);
        return;
      }
      if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
      const body = await response.json();
      state.samples.push(...body.samples);
      if (state.samples.length > KEEP) state.samples.splice(0, state.samples.length - KEEP);
      state.slo = body.policy.latency_slo_seconds;
      state.policy = body.policy;
      state.scaler = body.scaler;
      document.getElementById("policy").textContent =
        `${body.policy.name} · ${body.policy.min}–${body.policy.max} workers · target ${body.policy.target_concurrency} in flight each`;
      document.getElementById("driver").textContent = body.policy.driver;
      error.hidden = true;
      render();
    } catch (e) {
      error.textContent = "Cannot reach squall: " + e.message + " (retrying)";
      error.hidden = false;
    }
    setTimeout(poll, POLL_MS);
  }

  poll();
})();
