/* Dynamic Networks Catalog: sortable and filterable method tables.
 *
 * A table wrapper `div.catalog-table[data-columns]` names its columns; a `div.catalog-filters[data-table]`
 * holds a text box (`data-filter="text"`) and facet selects (`data-filter="<column>"`). Without
 * JavaScript the controls stay hidden and the table is a plain table. Self-written, no dependencies.
 */
(function () {
  "use strict";

  function cellText(row, index) {
    var cell = row.cells[index];
    return cell ? cell.textContent.trim() : "";
  }

  function sortKey(text) {
    var number = parseFloat(text);
    if (!isNaN(number) && /^[-+]?[0-9.]/.test(text)) return { n: number, t: text.toLowerCase() };
    return { n: null, t: text.toLowerCase() };
  }

  function compare(a, b) {
    if (a.n !== null && b.n !== null) return a.n - b.n;
    if (a.n !== null) return -1; // numbers before text such as "-"
    if (b.n !== null) return 1;
    return a.t < b.t ? -1 : a.t > b.t ? 1 : 0;
  }

  function makeSortable(table) {
    var headers = table.tHead ? table.tHead.rows[0].cells : [];
    Array.prototype.forEach.call(headers, function (th, index) {
      th.classList.add("catalog-sortable");
      th.setAttribute("tabindex", "0");
      th.setAttribute("aria-sort", "none");
      function sort() {
        var ascending = th.getAttribute("aria-sort") !== "ascending";
        Array.prototype.forEach.call(headers, function (h) { h.setAttribute("aria-sort", "none"); });
        th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (r1, r2) {
          var result = compare(sortKey(cellText(r1, index)), sortKey(cellText(r2, index)));
          return ascending ? result : -result;
        });
        rows.forEach(function (row) { body.appendChild(row); });
      }
      th.addEventListener("click", sort);
      th.addEventListener("keydown", function (event) {
        if (event.key === "Enter" || event.key === " ") { event.preventDefault(); sort(); }
      });
    });
  }

  function makeFilterable(bar, wrapper, table) {
    var columns = (wrapper.getAttribute("data-columns") || "").split(",");
    var controls = bar.querySelectorAll("[data-filter]");
    var count = bar.querySelector(".catalog-count");
    var rows = table.tBodies[0].rows;
    function apply() {
      var shown = 0;
      Array.prototype.forEach.call(rows, function (row) {
        var visible = true;
        Array.prototype.forEach.call(controls, function (control) {
          var value = control.value.trim().toLowerCase();
          if (!value) return;
          var key = control.getAttribute("data-filter");
          if (key === "text") {
            visible = visible && row.textContent.toLowerCase().indexOf(value) !== -1;
          } else {
            var index = columns.indexOf(key);
            var tokens = cellText(row, index).toLowerCase().split(/\s*,\s*/);
            visible = visible && tokens.indexOf(value) !== -1;
          }
        });
        row.hidden = !visible;
        if (visible) shown += 1;
      });
      if (count) count.textContent = shown + " of " + rows.length + " shown";
    }
    Array.prototype.forEach.call(controls, function (control) {
      control.addEventListener("input", apply);
      control.addEventListener("change", apply);
    });
    bar.hidden = false;
    apply();
  }

  function init() {
    document.querySelectorAll(".catalog-table").forEach(function (wrapper) {
      var table = wrapper.querySelector("table");
      if (!table || wrapper.getAttribute("data-ready")) return;
      wrapper.setAttribute("data-ready", "1");
      makeSortable(table);
      var bar = document.querySelector('.catalog-filters[data-table="' + wrapper.id + '"]');
      if (bar) makeFilterable(bar, wrapper, table);
    });
  }

  if (typeof window.document$ !== "undefined" && window.document$.subscribe) {
    window.document$.subscribe(init); // Material's instant navigation, if it is ever enabled
  } else if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();
