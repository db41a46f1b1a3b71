/**
 * Tables of the console. Wider than the screen they scroll sideways (the
 * region takes the keyboard's focus); on a phone each row is shown as a
 * card of "header: value" lines. The explicit table roles keep the table's
 * meaning for screen readers when the phone layout changes its display.
 */

import { h, replaceChildren, type Child } from "./dom.js";

export interface Column {
  header: string;
  /** Right-aligned figures. */
  numeric?: boolean;
}

export interface Table {
  element: HTMLElement;
  /** Shows these rows, one list of cell contents each (in column order). */
  setRows(rows: Child[][]): void;
}

export function dataTable(captionId: string, caption: string, columns: Column[]): Table {
  const body = h("tbody", { role: "rowgroup" });
  const element = h(
    "div",
    // Focusable, so a keyboard can scroll it; named by the caption.
    { class: "table-scroll", role: "region", "aria-labelledby": captionId, tabindex: 0 },
    h(
      "table",
      { role: "table" },
      h("caption", { id: captionId, class: "sr-only" }, caption),
      h(
        "thead",
        { role: "rowgroup" },
        h("tr", { role: "row" }, ...columns.map((column) => h("th", { scope: "col", role: "columnheader" }, column.header))),
      ),
      body,
    ),
  );
  return {
    element,
    setRows(rows) {
      element.hidden = rows.length === 0;
      replaceChildren(
        body,
        ...rows.map((cells) =>
          h(
            "tr",
            { role: "row" },
            ...cells.map((cell, index) => {
              const column = columns[index];
              return h(
                "td",
                { role: "cell", class: column?.numeric ? "number" : undefined, "data-label": column?.header },
                cell,
              );
            }),
          ),
        ),
      );
    },
  };
}

export interface Pager {
  element: HTMLElement;
  /** Page `page`; `pages` when the total is known; whether a next page exists. */
  show(page: number, pages: number | undefined, hasNext: boolean): void;
}

/** "Previous · Page N of M · Next"; `go(page)` is called with the page asked for. */
export function pager(label: string, go: (page: number) => void): Pager {
  let current = 1;
  const previous = h("button", { type: "button", class: "secondary" }, "Previous");
  const next = h("button", { type: "button", class: "secondary" }, "Next");
  const where = h("span", {});
  previous.addEventListener("click", () => go(current - 1));
  next.addEventListener("click", () => go(current + 1));
  const element = h("nav", { class: "pager", "aria-label": label, hidden: true }, previous, where, next);
  return {
    element,
    show(page, pages, hasNext) {
      current = page;
      element.hidden = page === 1 && !hasNext;
      previous.disabled = page <= 1;
      next.disabled = !hasNext;
      where.textContent = pages === undefined ? `Page ${page}` : `Page ${page} of ${pages}`;
    },
  };
}
