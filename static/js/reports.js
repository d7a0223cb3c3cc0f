// The report's period fields (keys.report_views): editing the month, the quarter or a
// custom date picks the matching kind in the "Kind" select, so the report shows what
// was just typed.  Without this script the form still works: the kind is chosen by hand.
(function () {
  "use strict";

  const kinds = { "report-month": "month", "report-quarter": "quarter", "report-from": "custom", "report-to": "custom" };

  document.addEventListener("DOMContentLoaded", () => {
    const select = document.getElementById("report-period");
    if (!select) return;
    Object.keys(kinds).forEach((id) => {
      const field = document.getElementById(id);
      if (!field) return;
      field.addEventListener("input", () => {
        select.value = kinds[id];
      });
    });
  });
})();
