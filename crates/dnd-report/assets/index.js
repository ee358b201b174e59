// dnd report: the index table. Sorts, filters and pages window.DND_REPORT.rows (from
// neurons.js) in the browser; nothing is fetched.
(function () {
  "use strict";
  var data = window.DND_REPORT || { rows: [], layers: [], truth: false, evaluated: false, pageSize: 100 };
  // Row layout in neurons.js: [layer, neuron, label, score, status, page, other labels, truth,
  // simulation correlation of the top label, its CoSy AUC, unit kind (channel, direction, sae)].
  var cell = function (v) { return v === null || v === undefined ? "–" : v.toFixed(3); };
  var rows = data.rows.map(function (r, i) {
    return { layer: r[0], neuron: r[1], label: r[2], score: r[3], status: r[4], href: r[5], others: r[6] || "",
             truth: r[7], correlation: r[8], cosy: r[9], unit: r[10] || "channel", order: i, text: ((r[2] || "") + " | " + (r[6] || "")).toLowerCase() };
  });
  var layerOrder = {};
  data.layers.forEach(function (l, i) { layerOrder[l] = i; });
  var state = { layer: "", text: "", min: null, max: null, rmax: null, key: null, dir: 1, page: 0 };
  var el = function (id) { return document.getElementById(id); };
  var tbody = document.querySelector("#neurons tbody");
  var esc = function (s) {
    return String(s).replace(/[&<>"']/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c];
    });
  };
  var shown = rows;

  function compare(a, b) {
    var k = state.key, x = a[k], y = b[k];
    if (k === "layer") { x = layerOrder[x]; y = layerOrder[y]; }
    if (x === null || x === undefined) return (y === null || y === undefined) ? a.order - b.order : 1;
    if (y === null || y === undefined) return -1;
    var c = (typeof x === "number" && typeof y === "number") ? x - y : String(x).localeCompare(String(y));
    return c !== 0 ? c * state.dir : a.order - b.order;
  }

  function apply() {
    var words = state.text.toLowerCase().split(/\s+/).filter(Boolean);
    shown = rows.filter(function (r) {
      if (state.layer && r.layer !== state.layer) return false;
      for (var i = 0; i < words.length; i++) if (r.text.indexOf(words[i]) < 0) return false;
      if (state.min !== null && !(r.score !== null && r.score >= state.min)) return false;
      if (state.max !== null && !(r.score !== null && r.score <= state.max)) return false;
      if (state.rmax !== null && !(r.correlation !== null && r.correlation !== undefined && r.correlation <= state.rmax)) return false;
      return true;
    });
    if (state.key) shown = shown.slice().sort(compare);
    var pages = Math.max(1, Math.ceil(shown.length / data.pageSize));
    if (state.page >= pages) state.page = pages - 1;
    render(pages);
  }

  function render(pages) {
    var start = state.page * data.pageSize, part = shown.slice(start, start + data.pageSize), html = [];
    for (var i = 0; i < part.length; i++) {
      var r = part[i];
      html.push("<tr><td>" + esc(r.layer) + "</td><td>" + r.neuron +
        (r.unit === "channel" ? "" : " <span class=\"unit unit-" + esc(r.unit) + "\">" + esc(r.unit === "sae" ? "SAE latent" : r.unit) + "</span>") +
        "</td><td><a href=\"neurons/" + esc(r.href) + "\">" +
        (r.label === null ? "<em>(" + esc(r.status.replace("_", " ")) + ")</em>" : esc(r.label)) + "</a></td><td>" +
        (r.score === null ? "–" : r.score.toFixed(3)) + "</td><td><span class=\"status status-" + esc(r.status) + "\">" +
        esc(r.status.replace("_", " ")) + "</span></td>" + (data.truth ? "<td>" + esc(r.truth || "") + "</td>" : "") +
        (data.evaluated ? "<td>" + cell(r.correlation) + "</td><td>" + cell(r.cosy) + "</td>" : "") +
        "<td>" + esc(r.others) + "</td></tr>");
    }
    tbody.innerHTML = html.join("");
    el("count").textContent = shown.length === rows.length
      ? rows.length + " neurons"
      : shown.length + " of " + rows.length + " neurons match";
    el("page").textContent = "Page " + (state.page + 1) + " of " + pages;
    el("prev").disabled = state.page === 0;
    el("next").disabled = state.page >= pages - 1;
    document.querySelectorAll("#neurons th[data-key]").forEach(function (th) {
      th.setAttribute("aria-sort", th.dataset.key === state.key ? (state.dir > 0 ? "ascending" : "descending") : "none");
    });
  }

  var number = function (v) { return v === "" || isNaN(parseFloat(v)) ? null : parseFloat(v); };
  el("f-layer").addEventListener("change", function (e) { state.layer = e.target.value; state.page = 0; apply(); });
  el("f-text").addEventListener("input", function (e) { state.text = e.target.value; state.page = 0; apply(); });
  el("f-min").addEventListener("input", function (e) { state.min = number(e.target.value); state.page = 0; apply(); });
  el("f-max").addEventListener("input", function (e) { state.max = number(e.target.value); state.page = 0; apply(); });
  if (el("f-rmax")) el("f-rmax").addEventListener("input", function (e) { state.rmax = number(e.target.value); state.page = 0; apply(); });
  el("filters").addEventListener("reset", function () {
    state.layer = ""; state.text = ""; state.min = null; state.max = null; state.rmax = null; state.page = 0;
    setTimeout(apply, 0);
  });
  el("prev").addEventListener("click", function () { if (state.page > 0) { state.page--; apply(); } });
  el("next").addEventListener("click", function () { state.page++; apply(); });
  document.querySelectorAll("#neurons th button[data-sort]").forEach(function (b) {
    b.addEventListener("click", function () {
      var k = b.dataset.sort;
      if (state.key === k) state.dir = -state.dir; else { state.key = k; state.dir = (k === "score") ? -1 : 1; }
      state.page = 0; apply();
    });
  });
  apply();
  if (window.performance && performance.mark) performance.mark("dnd-table-rendered");
})();
