// Sort (click or Enter on a header), filter (text box, flagged rows) and column toggle for the layer table.
// Plain DOM, no library: the report must open offline from a single file.
(function () {
  "use strict";
  var table = document.getElementById("layer-table");
  if (!table) { return; }
  var tbody = table.tBodies[0];
  var rows = Array.prototype.slice.call(tbody.rows);
  var headers = Array.prototype.slice.call(table.tHead.rows[0].cells);
  var filter = document.getElementById("filter");
  var flagged = document.getElementById("only-flagged");
  var allColumns = document.getElementById("all-columns");
  var count = document.getElementById("row-count");

  function value(row, index, numeric) {
    var raw = row.cells[index].getAttribute("data-v") || "";
    if (!numeric) { return raw.toLowerCase(); }
    if (raw === "") { return null; }
    var number = parseFloat(raw);
    return isNaN(number) ? null : number;
  }

  function sortBy(index) {
    var th = headers[index];
    var numeric = th.getAttribute("data-type") === "num";
    var ascending = th.getAttribute("aria-sort") !== "ascending";
    headers.forEach(function (h) { h.setAttribute("aria-sort", "none"); });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    var keyed = rows.map(function (row, i) { return { row: row, key: value(row, index, numeric), i: i }; });
    keyed.sort(function (a, b) {
      if (a.key === null || a.key === "") { return (b.key === null || b.key === "") ? a.i - b.i : 1; }
      if (b.key === null || b.key === "") { return -1; }  // missing values always last
      var c = numeric ? (a.key < b.key ? -1 : a.key > b.key ? 1 : 0) : a.key.localeCompare(b.key);
      return (ascending ? c : -c) || a.i - b.i;
    });
    var fragment = document.createDocumentFragment();
    keyed.forEach(function (k) { fragment.appendChild(k.row); });
    tbody.appendChild(fragment);
    rows = keyed.map(function (k) { return k.row; });
  }

  headers.forEach(function (th, index) {
    th.addEventListener("click", function () { sortBy(index); });
    th.addEventListener("keydown", function (e) {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortBy(index); }
    });
  });

  function applyFilter() {
    var words = (filter.value || "").toLowerCase().split(/\s+/).filter(Boolean);
    var onlyFlagged = flagged && flagged.checked;
    var shown = 0;
    rows.forEach(function (row) {
      var text = row.textContent.toLowerCase();
      var ok = words.every(function (w) { return text.indexOf(w) !== -1; });
      if (ok && onlyFlagged) {
        ok = row.classList.contains("excluded") || row.classList.contains("nonfinite");
      }
      row.hidden = !ok;
      if (ok) { shown += 1; }
    });
    count.textContent = shown + " of " + rows.length + " layers";
  }

  filter.addEventListener("input", applyFilter);
  if (flagged) { flagged.addEventListener("change", applyFilter); }
  if (allColumns) {
    allColumns.addEventListener("change", function () {
      table.classList.toggle("show-all", allColumns.checked);
    });
  }
})();
