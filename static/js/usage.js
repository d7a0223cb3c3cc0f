// The usage dashboard's charts (Chart.js, vendored in static/vendor/chartjs/).
// No inline script (strict CSP): the data is a json_script block (#usage-charts), each
// <canvas data-chart="name"> draws one figure, and the colours are the page's CSS
// custom properties (--chart-1..7, --status-*, --fg, --muted, --line) so the charts
// follow the stylesheet.  The tables beside the charts hold the same numbers.
(function () {
  "use strict";

  function cssVar(name, fallback) {
    const value = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
    return value || fallback;
  }

  const STATUS_KEYS = ["ok", "rate_limited", "client_error", "upstream_error", "cancelled", "interrupted"];

  function palette(figure, count) {
    if (figure === "status") {
      return STATUS_KEYS.map((key) => cssVar("--status-" + key, "#888"));
    }
    const colours = [];
    for (let i = 0; i < count; i += 1) {
      colours.push(cssVar("--chart-" + ((i % 7) + 1), "#888"));
    }
    return colours;
  }

  function shortLabel(label) {
    return label.length > 28 ? label.slice(0, 27) + "…" : label;
  }

  function draw(canvas, name, spec) {
    const colours = palette(name, spec.series.length);
    const fg = cssVar("--fg", "#1d2430");
    const muted = cssVar("--muted", "#667085");
    const line = cssVar("--line", "#dde1e7");
    const font = getComputedStyle(document.body).fontFamily;
    const horizontal = !!spec.horizontal;
    const datasets = spec.series.map((series, index) => ({
      label: series.label,
      data: series.data.map((value) => (value === "" ? null : Number(value))),
      backgroundColor: colours[index % colours.length],
      borderColor: colours[index % colours.length],
      borderWidth: 0,
      maxBarThickness: 28,
    }));
    const indexAxis = horizontal ? "y" : "x";
    const valueAxis = horizontal ? "x" : "y";
    const scales = {};
    scales[indexAxis] = {
      stacked: !!spec.stacked,
      ticks: { color: muted, autoSkip: true, maxRotation: 0, callback: function (value) {
        return shortLabel(String(this.getLabelForValue(value)));
      } },
      grid: { display: false },
    };
    scales[valueAxis] = {
      stacked: !!spec.stacked,
      beginAtZero: true,
      ticks: { color: muted },
      grid: { color: line },
    };
    return new window.Chart(canvas, {
      type: "bar",
      data: { labels: spec.labels, datasets: datasets },
      options: {
        indexAxis: indexAxis,
        responsive: true,
        maintainAspectRatio: false,
        animation: false,
        font: { family: font },
        plugins: {
          legend: {
            display: spec.series.length > 1,
            position: "bottom",
            labels: { color: fg, boxWidth: 12, font: { family: font } },
          },
          tooltip: { mode: "index", intersect: false },
        },
        scales: scales,
      },
    });
  }

  function start() {
    const data = document.getElementById("usage-charts");
    if (!data || !window.Chart) return;
    const charts = JSON.parse(data.textContent);
    window.Chart.defaults.font.family = getComputedStyle(document.body).fontFamily;
    document.querySelectorAll("canvas[data-chart]").forEach((canvas) => {
      const name = canvas.getAttribute("data-chart");
      if (charts[name] && charts[name].labels.length) {
        draw(canvas, name, charts[name]);
      }
    });
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
