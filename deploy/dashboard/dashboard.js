// liveloop monitor page. Every number comes from the monitor's REST routes (Envoy's gRPC-JSON
// transcoder in front of liveloop.monitor.v1.MonitorService), called with the API key this tab keeps
// in sessionStorage. Charts are plain SVG drawn here: nothing is loaded from another origin.
"use strict";

(() => {
  const KEY_STORAGE = "liveloop.dashboard.apiKey";
  const REFRESH_MS = 10000;
  const CALL_TIMEOUT_MS = 8000;
  const PALETTE = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
    "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22",
  ];
  const SVG = "http://www.w3.org/2000/svg";

  const $ = (id) => document.getElementById(id);
  let apiKey = null;
  let timer = null;
  let refreshing = false;
  let again = false; // a refresh was asked for while one ran (a new deployment or window)

  // ---------------------------------------------------------------------------------------------
  // the API key: from a #key=... fragment once (then removed from the address bar), else asked for

  function takeKeyFromFragment() {
    const fragment = new URLSearchParams(window.location.hash.replace(/^#/, ""));
    const key = fragment.get("key");
    if (key) {
      sessionStorage.setItem(KEY_STORAGE, key);
      history.replaceState(null, "", window.location.pathname + window.location.search);
    }
  }

  function askForKey(message) {
    apiKey = null;
    sessionStorage.removeItem(KEY_STORAGE);
    clearTimeout(timer);
    $("board").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    document.body.dataset.state = "needs-key";
    setStatus("an API key is needed", false);
    $("key-input").focus();
  }

  // ---------------------------------------------------------------------------------------------
  // REST calls

  class ApiError extends Error {
    constructor(httpStatus, message, code) {
      super(message);
      this.httpStatus = httpStatus;
      this.code = code;
    }
  }

  const GRPC_CODES = [
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
    "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
  ];

  function describe(error) {
    if (error instanceof ApiError) {
      const code = GRPC_CODES[error.code] || `HTTP ${error.httpStatus}`;
      return `${code}: ${error.message}`;
    }
    if (error && error.name === "AbortError") {
      return "no answer within " + CALL_TIMEOUT_MS / 1000 + " s";
    }
    return String(error && error.message ? error.message : error);
  }

  async function call(path) {
    const controller = new AbortController();
    const abort = setTimeout(() => controller.abort(), CALL_TIMEOUT_MS);
    try {
      const response = await fetch(path, {
        headers: { "x-api-key": apiKey, accept: "application/json" },
        cache: "no-store",
        credentials: "omit",
        referrerPolicy: "no-referrer",
        signal: controller.signal,
      });
      const text = await response.text();
      let body = null;
      try {
        body = text ? JSON.parse(text) : null;
      } catch (_) {
        body = null;
      }
      if (!response.ok) {
        const message = body && body.message ? body.message : text.trim() || response.statusText;
        throw new ApiError(response.status, message, body && typeof body.code === "number" ? body.code : null);
      }
      return body || {};
    } finally {
      clearTimeout(abort);
    }
  }

  // A missing or wrong key (UNAUTHENTICATED), or one without the admin role (PERMISSION_DENIED).
  const isAuthError = (error) =>
    error instanceof ApiError && ([16, 7].includes(error.code) || [401, 403].includes(error.httpStatus));

  // ---------------------------------------------------------------------------------------------
  // numbers and text

  const num = (value) => (value === undefined || value === null || value === "" ? 0 : Number(value));
  const time = (value) => (value ? Date.parse(value) : NaN);
  const percent = (value) => (100 * value).toFixed(1) + " %";
  const integer = (value) => Math.round(value).toLocaleString("en-US");
  const millis = (seconds) => (1000 * seconds).toFixed(seconds < 0.01 ? 2 : 1) + " ms";
  const clock = (ms) => {
    const d = new Date(ms);
    return String(d.getHours()).padStart(2, "0") + ":" + String(d.getMinutes()).padStart(2, "0");
  };

  function el(tag, attributes, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes || {})) {
      if (name === "text") node.textContent = value;
      else node.setAttribute(name, value);
    }
    for (const child of children) if (child) node.append(child);
    return node;
  }

  function svg(tag, attributes, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attributes || {})) node.setAttribute(name, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function setStatus(message, isError) {
    const status = $("status");
    status.textContent = message;
    status.className = isError ? "error" : "";
  }

  function showText(containerId, message, isError) {
    const container = $(containerId);
    container.replaceChildren(el("p", { class: isError ? "error" : "empty", "data-empty": "true", text: message }));
  }

  // ---------------------------------------------------------------------------------------------
  // charts: line charts (a path per series, a marker per point) and bar charts, in plain SVG

  const HEIGHT = 240;
  const MARGIN = { left: 58, right: 24, top: 12, bottom: 26 };

  function niceMax(value) {
    if (!(value > 0)) return 1;
    const magnitude = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [1, 2, 4, 8, 10]) if (step * magnitude >= value) return step * magnitude;
    return 10 * magnitude;
  }

  function frame(chart, x0, x1, yMax, yFormat) {
    // The wide chart gets a wider drawing, so its text keeps the size of the others'.
    const width = chart.wide ? 1280 : 640;
    const root = svg("svg", {
      viewBox: `0 0 ${width} ${HEIGHT + (chart.legendRows ? chart.legendRows * 18 + 6 : 0)}`,
      role: "img",
      "data-chart": chart.name,
      "aria-label": chart.label,
    });
    const plotW = width - MARGIN.left - MARGIN.right;
    const plotH = HEIGHT - MARGIN.top - MARGIN.bottom;
    const span = Math.max(x1 - x0, 1);
    const x = (t) => MARGIN.left + ((t - x0) / span) * plotW;
    const y = (v) => MARGIN.top + plotH - (Math.max(v, 0) / yMax) * plotH;
    const grid = svg("g", { class: "grid-lines" });
    for (let i = 0; i <= 4; i++) {
      const value = (yMax * i) / 4;
      grid.append(svg("line", { class: "grid", x1: MARGIN.left, x2: width - MARGIN.right, y1: y(value), y2: y(value) }));
      grid.append(svg("text", { x: MARGIN.left - 6, y: y(value) + 4, "text-anchor": "end" }, yFormat(value)));
    }
    const ticks = 6;
    for (let i = 0; i <= ticks; i++) {
      const t = x0 + (span * i) / ticks;
      const anchor = i === 0 ? "start" : i === ticks ? "end" : "middle";
      grid.append(svg("text", { x: x(t), y: HEIGHT - 8, "text-anchor": anchor }, clock(t)));
    }
    grid.append(svg("line", { class: "axis", x1: MARGIN.left, x2: MARGIN.left, y1: MARGIN.top, y2: MARGIN.top + plotH }));
    grid.append(svg("line", { class: "axis", x1: MARGIN.left, x2: width - MARGIN.right, y1: MARGIN.top + plotH, y2: MARGIN.top + plotH }));
    root.append(grid);
    return { root, x, y, plotW, span };
  }

  function legend(root, series, perRow) {
    const group = svg("g", { class: "legend" });
    series.forEach((s, index) => {
      const lx = MARGIN.left + (index % perRow) * 145;
      const ly = HEIGHT + 6 + Math.floor(index / perRow) * 18;
      group.append(svg("rect", { x: lx, y: ly, width: 12, height: 12, fill: s.color }));
      group.append(svg("text", { x: lx + 16, y: ly + 10 }, s.name.length > 20 ? s.name.slice(0, 19) + "..." : s.name));
    });
    root.append(group);
  }

  function lineChart(containerId, chart) {
    const { series, x0, x1, yFormat } = chart;
    const drawn = series.filter((s) => s.points.length > 0);
    if (drawn.length === 0) {
      showText(containerId, "no traffic in the window", false);
      return;
    }
    const top = chart.yMax || niceMax(Math.max(...drawn.flatMap((s) => s.points.map((p) => p[1]))));
    const perRow = chart.wide ? 8 : 4;
    chart.legendRows = Math.ceil(drawn.length / perRow);
    const { root, x, y } = frame(chart, x0, x1, top, yFormat);
    for (const s of drawn) {
      const group = svg("g", { "data-series": s.name, "data-points": s.points.length, "data-total": s.total ?? "" });
      const d = s.points.map((p, i) => `${i ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ");
      group.append(svg("path", { class: "series", d, stroke: s.color, "data-series": s.name }));
      for (const p of s.points) {
        const marker = svg("circle", { cx: x(p[0]).toFixed(1), cy: y(p[1]).toFixed(1), r: 3, fill: s.color, "data-value": p[1] });
        marker.append(svg("title", {}, `${s.name} ${clock(p[0])}: ${yFormat(p[1])}`));
        group.append(marker);
      }
      root.append(group);
    }
    legend(root, drawn, perRow);
    $(containerId).replaceChildren(root);
  }

  function barChart(containerId, chart) {
    const { bars, x0, x1, yFormat, color } = chart;
    if (bars.length === 0) {
      showText(containerId, "no traffic in the window", false);
      return;
    }
    const top = niceMax(Math.max(...bars.map((b) => b[1])));
    const { root, x, y, plotW, span } = frame(chart, x0, x1, top, yFormat);
    const width = Math.max(2, Math.min(24, (plotW * 60000) / span - 2));
    const group = svg("g", { "data-series": chart.name, "data-points": bars.length });
    for (const [t, value] of bars) {
      const left = x(t + 30000) - width / 2;
      const rect = svg("rect", {
        class: "bar", x: left.toFixed(1), y: y(value).toFixed(1), width: width.toFixed(1),
        height: (y(0) - y(value)).toFixed(1), fill: color, "data-minute": new Date(t).toISOString(), "data-value": value,
      });
      rect.append(svg("title", {}, `${clock(t)}: ${yFormat(value)}`));
      group.append(rect);
    }
    root.append(group);
    $(containerId).replaceChildren(root);
  }

  // ---------------------------------------------------------------------------------------------
  // tables

  function table(containerId, columns, rows, emptyText) {
    if (rows.length === 0) {
      showText(containerId, emptyText, false);
      return;
    }
    const head = el("tr", {}, ...columns.map((c) => el("th", { class: c.num ? "num" : "", text: c.title })));
    const body = rows.map((row) => {
      const tr = el("tr", row.attributes || {});
      for (const c of columns) {
        const cell = el("td", { class: c.num ? "num" : "", "data-column": c.key });
        const value = c.render ? c.render(row.data) : row.data[c.key];
        if (value instanceof Node) cell.append(value);
        else cell.textContent = value === undefined || value === null ? "" : String(value);
        tr.append(cell);
      }
      return tr;
    });
    $(containerId).replaceChildren(el("table", {}, el("thead", {}, head), el("tbody", {}, ...body)));
  }

  function tile(field, label, value, shown) {
    return el(
      "div",
      { class: "tile" },
      el("span", { class: "label", text: label }),
      el("span", { class: "value", "data-field": field, "data-value": String(value), text: shown }),
    );
  }

  // ---------------------------------------------------------------------------------------------
  // rendering each answer

  function offerColors(summary, series) {
    const names = new Set();
    for (const row of (summary && summary.by_offer) || []) names.add(row.offer);
    for (const point of (series && series.offers) || []) names.add(point.offer);
    const colors = new Map();
    [...names].sort().forEach((name, index) => colors.set(name, PALETTE[index % PALETTE.length]));
    return colors;
  }

  function renderSummary(summary, colors) {
    const log = summary.decision_log || {};
    $("tiles").replaceChildren(
      tile("invocations", "invocations", num(summary.invocations), integer(num(summary.invocations))),
      tile("responses", "responses", num(summary.responses), integer(num(summary.responses))),
      tile("impressions", "offers presented", num(summary.impressions), integer(num(summary.impressions))),
      tile("accepted", "offers accepted", num(summary.accepted), integer(num(summary.accepted))),
      tile("uptake_rate", "uptake", num(summary.uptake_rate), percent(num(summary.uptake_rate))),
      tile("explore_share", "explore share", num(summary.explore_share), percent(num(summary.explore_share))),
      tile("head_revision", "head revision", num(summary.head_revision), String(num(summary.head_revision))),
      tile("late_responses", "late responses", num(summary.late_responses), integer(num(summary.late_responses))),
      tile("lag", "decision log lag", num(log.lag), num(log.lag) < 0 ? "unknown" : integer(num(log.lag))),
      tile("trimmed_entries", "trimmed before read", num(log.trimmed_entries), integer(num(log.trimmed_entries))),
    );
    const offers = (summary.by_offer || []).map((row) => ({
      attributes: { "data-offer": row.offer },
      data: row,
    }));
    table(
      "table-offers",
      [
        {
          key: "offer", title: "offer",
          render: (r) => {
            const swatch = svg("svg", { width: 10, height: 10, "aria-hidden": "true" });
            swatch.append(svg("rect", { width: 10, height: 10, fill: colors.get(r.offer) || "#999" }));
            return el("span", {}, swatch, document.createTextNode(" " + r.offer));
          },
        },
        { key: "impressions", title: "presented", num: true, render: (r) => integer(num(r.impressions)) },
        { key: "accepted", title: "accepted", num: true, render: (r) => integer(num(r.accepted)) },
        { key: "uptake_rate", title: "uptake", num: true, render: (r) => percent(num(r.uptake_rate)) },
        {
          key: "explored", title: "explored", num: true,
          render: (r) => (num(r.impressions) ? percent(num(r.explored_impressions) / num(r.impressions)) : "-"),
        },
      ],
      offers,
      "no offer presented in the window",
    );
    const head = num(summary.head_revision);
    table(
      "table-replicas",
      [
        { key: "replica_id", title: "replica" },
        { key: "config_revision", title: "revision served", num: true, render: (r) => String(num(r.config_revision)) },
        { key: "head", title: "head", num: true, render: () => String(head) },
        { key: "stale", title: "state", render: (r) => (r.stale ? "stale" : "current") },
        { key: "invocations", title: "invocations", num: true, render: (r) => integer(num(r.invocations)) },
        { key: "last_seen", title: "last decision", render: (r) => (r.last_seen ? new Date(time(r.last_seen)).toLocaleTimeString("en-GB") : "") },
      ],
      (summary.replicas || []).map((row) => ({
        attributes: { "data-replica": row.replica_id, "data-revision": String(num(row.config_revision)), class: row.stale ? "stale" : "" },
        data: row,
      })),
      "no replica logged a decision in the window",
    );
    table(
      "table-latency",
      [
        { key: "method", title: "method", render: (r) => r.method.replace(/^.*\//, "") },
        { key: "count", title: "calls", num: true, render: (r) => integer(num(r.count)) },
        { key: "p50", title: "p50", num: true, render: (r) => millis(num(r.p50_seconds)) },
        { key: "p90", title: "p90", num: true, render: (r) => millis(num(r.p90_seconds)) },
        { key: "p99", title: "p99", num: true, render: (r) => millis(num(r.p99_seconds)) },
        { key: "max", title: "max", num: true, render: (r) => millis(num(r.max_seconds)) },
      ],
      (summary.latency || []).map((row) => ({ attributes: { "data-method": row.method }, data: row })),
      "no calls measured in the window",
    );
  }

  function renderSeries(series, colors) {
    const x0 = time(series.window_start);
    const x1 = time(series.window_end);
    const byOffer = new Map();
    const explore = new Map();
    for (const point of series.offers || []) {
      const minute = time(point.minute);
      const shown = num(point.impressions);
      if (!byOffer.has(point.offer)) byOffer.set(point.offer, { points: [], impressions: 0 });
      const entry = byOffer.get(point.offer);
      entry.impressions += shown;
      if (shown > 0) entry.points.push([minute, num(point.accepted) / shown]);
      const sum = explore.get(minute) || [0, 0];
      explore.set(minute, [sum[0] + num(point.explored_impressions), sum[1] + shown]);
    }
    lineChart("chart-uptake", {
      name: "uptake", label: "uptake per offer per minute", x0, x1, yFormat: percent, wide: true,
      series: [...byOffer.keys()].sort().map((offer) => ({
        name: offer, color: colors.get(offer), points: byOffer.get(offer).points, total: byOffer.get(offer).impressions,
      })),
    });
    lineChart("chart-explore", {
      name: "explore", label: "explore share per minute", x0, x1, yFormat: percent, yMax: 1,
      series: [{
        name: "explore share", color: "#9467bd",
        points: [...explore.entries()].filter(([, s]) => s[1] > 0).sort((a, b) => a[0] - b[0]).map(([t, s]) => [t, s[0] / s[1]]),
      }],
    });
    const invokes = (series.invocations || []).map((m) => ({ t: time(m.minute), calls: num(m.invocations), p50: num(m.p50_seconds), p99: num(m.p99_seconds) }));
    barChart("chart-rate", {
      name: "rate", label: "Invoke calls per minute", x0, x1, color: "#1f77b4",
      yFormat: (v) => (v >= 10 ? integer(v) : String(Math.round(v * 10) / 10)),
      bars: invokes.map((m) => [m.t, m.calls]),
    });
    lineChart("chart-latency", {
      name: "latency", label: "Invoke latency per minute", x0, x1, yFormat: millis,
      series: [
        { name: "p50", color: "#2ca02c", points: invokes.map((m) => [m.t, m.p50]) },
        { name: "p99", color: "#d62728", points: invokes.map((m) => [m.t, m.p99]) },
      ],
    });
  }

  const SEVERITY = { SEVERITY_OK: "ok", SEVERITY_WARNING: "warning", SEVERITY_CRITICAL: "critical" };
  const severity = (value) => SEVERITY[value] || (value ? String(value).toLowerCase() : "");

  function renderAlerts(answer) {
    const firing = (answer.alerts || []).filter((a) => a.state === "ALERT_STATE_FIRING" || !a.state);
    table(
      "table-alerts",
      [
        { key: "severity", title: "severity", render: (a) => el("span", { class: "sev-" + severity(a.severity), text: severity(a.severity) }) },
        { key: "rule", title: "rule" },
        { key: "summary", title: "summary" },
        { key: "value", title: "value", num: true, render: (a) => Number(num(a.value).toPrecision(4)) },
        { key: "threshold", title: "threshold", num: true, render: (a) => Number(num(a.threshold).toPrecision(4)) },
        { key: "started_at", title: "since", render: (a) => (a.started_at ? new Date(time(a.started_at)).toLocaleString("en-GB") : "") },
      ],
      firing.map((a) => ({ attributes: { "data-alert": a.id, "data-rule": a.rule }, data: a })),
      "none",
    );
  }

  function renderDrift(answer) {
    const rows = [...(answer.features || [])];
    if (answer.score && answer.score.name) rows.push(answer.score);
    const fixed = (value, digits) => num(value).toFixed(digits);
    table(
      "table-drift",
      [
        { key: "name", title: "distribution" },
        { key: "psi", title: "PSI", num: true, render: (d) => fixed(d.psi, 3) },
        { key: "ks", title: "KS", num: true, render: (d) => fixed(d.ks_statistic, 3) },
        { key: "means", title: "mean (ref -> now)", num: true, render: (d) => `${fixed(d.reference_mean, 3)} -> ${fixed(d.current_mean, 3)}` },
        { key: "missing", title: "missing (ref -> now)", num: true, render: (d) => `${percent(num(d.reference_missing_rate))} -> ${percent(num(d.current_missing_rate))}` },
        { key: "count", title: "values", num: true, render: (d) => integer(num(d.current_count)) },
        { key: "severity", title: "severity", render: (d) => el("span", { class: "sev-" + severity(d.severity), text: severity(d.severity) }) },
      ],
      rows.map((d) => ({ attributes: { "data-distribution": d.name }, data: d })),
      "no drift measured (no model bound, or no traffic in the window)",
    );
  }

  // ---------------------------------------------------------------------------------------------
  // the refresh loop

  function chosenDeployment() {
    return $("deployment").value || new URLSearchParams(window.location.search).get("deployment") || "";
  }

  async function loadDeployments() {
    const wanted = new URLSearchParams(window.location.search).get("deployment");
    const select = $("deployment");
    let names = [];
    try {
      const answer = await call("/v1/config/deployments?page.page_size=1000");
      names = (answer.deployments || []).map((d) => d.name).filter(Boolean);
    } catch (error) {
      if (isAuthError(error)) throw error;
      setStatus("could not list deployments: " + describe(error), true);
    }
    if (wanted && !names.includes(wanted)) names.unshift(wanted);
    const current = select.value || wanted || names[0] || "";
    select.replaceChildren(...names.map((name) => el("option", { value: name, text: name })));
    select.value = current;
  }

  async function refresh() {
    if (!apiKey) return;
    if (refreshing) {
      again = true;
      return;
    }
    refreshing = true;
    clearTimeout(timer);
    const deployment = chosenDeployment();
    const windowParam = `window=${$("window").value}s`;
    try {
      if (!deployment) {
        document.body.dataset.state = "no-deployment";
        setStatus("no deployment to show: publish one, or open /dashboard?deployment=NAME", true);
        return;
      }
      const base = "/v1/monitor/" + encodeURIComponent(deployment);
      const [summary, series, alerts, drift] = await Promise.allSettled([
        call(`${base}/summary?${windowParam}`),
        call(`${base}/time-series?${windowParam}`),
        call("/v1/monitor/alerts?deployment=" + encodeURIComponent(deployment)),
        call(`${base}/drift`),
      ]);
      const failures = [summary, series, alerts, drift].filter((r) => r.status === "rejected");
      const authFailure = failures.find((r) => isAuthError(r.reason));
      if (authFailure) {
        askForKey("the key was refused: " + describe(authFailure.reason));
        return;
      }
      const colors = offerColors(summary.value, series.value);
      if (summary.status === "fulfilled") renderSummary(summary.value, colors);
      else {
        $("tiles").replaceChildren(el("p", { class: "error", text: "summary unavailable: " + describe(summary.reason) }));
        for (const id of ["table-offers", "table-replicas", "table-latency"]) showText(id, "unavailable: " + describe(summary.reason), true);
      }
      if (series.status === "fulfilled") renderSeries(series.value, colors);
      else for (const id of ["chart-uptake", "chart-explore", "chart-rate", "chart-latency"]) showText(id, "unavailable: " + describe(series.reason), true);
      if (alerts.status === "fulfilled") renderAlerts(alerts.value);
      else showText("table-alerts", "unavailable: " + describe(alerts.reason), true);
      if (drift.status === "fulfilled") renderDrift(drift.value);
      else showText("table-drift", "unavailable: " + describe(drift.reason), true);

      const core = summary.status === "fulfilled" && series.status === "fulfilled";
      document.body.dataset.state = core ? "ready" : "error";
      document.body.dataset.deployment = deployment;
      document.body.dataset.refreshes = String(num(document.body.dataset.refreshes) + 1);
      const when = new Date().toLocaleTimeString("en-GB");
      if (core) setStatus(`${deployment}: updated ${when}, every ${REFRESH_MS / 1000} s`, false);
      else setStatus(`${deployment}: ${failures.length} of 4 calls failed at ${when}`, true);
    } catch (error) {
      document.body.dataset.state = "error";
      setStatus("refresh failed: " + describe(error), true);
    } finally {
      refreshing = false;
      if (apiKey) timer = setTimeout(refresh, again ? 0 : REFRESH_MS);
      again = false;
    }
  }

  async function start() {
    apiKey = sessionStorage.getItem(KEY_STORAGE);
    if (!apiKey) {
      askForKey("");
      return;
    }
    $("login").hidden = true;
    $("board").hidden = false;
    try {
      await loadDeployments();
    } catch (error) {
      askForKey("the key was refused: " + describe(error));
      return;
    }
    await refresh();
  }

  function rememberDeployment() {
    const params = new URLSearchParams(window.location.search);
    params.set("deployment", $("deployment").value);
    history.replaceState(null, "", window.location.pathname + "?" + params.toString());
  }

  document.addEventListener("DOMContentLoaded", () => {
    takeKeyFromFragment();
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = $("key-input").value.trim();
      $("key-input").value = "";
      if (!key) return;
      sessionStorage.setItem(KEY_STORAGE, key);
      start();
    });
    $("forget").addEventListener("click", () => askForKey("key forgotten"));
    $("refresh").addEventListener("click", () => refresh());
    $("deployment").addEventListener("change", () => {
      rememberDeployment();
      refresh();
    });
    $("window").addEventListener("change", () => refresh());
    start();
  });
})();
