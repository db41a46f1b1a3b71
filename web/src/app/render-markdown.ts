/**
 * DOM nodes for the Markdown tree of `markdown.ts`. Text goes in only as
 * text nodes; links get only the http(s) destinations the parser accepted,
 * open in a new tab with `rel="noopener noreferrer nofollow"`.
 */

import { h } from "./dom.js";
import { parseMarkdown, type Block, type Inline } from "./markdown.js";

export function renderMarkdown(text: string): DocumentFragment {
  const fragment = document.createDocumentFragment();
  for (const block of parseMarkdown(text)) fragment.appendChild(renderBlock(block));
  return fragment;
}

function renderBlock(block: Block): Node {
  switch (block.kind) {
    case "paragraph":
      return h("p", {}, ...block.children.map(renderInline));
    case "heading": {
      // Headings of a reply sit below the page's h1 and the conversation's h2.
      const level = Math.min(6, block.level + 2);
      const tag = `h${level}` as "h3" | "h4" | "h5" | "h6";
      return h(tag, {}, ...block.children.map(renderInline));
    }
    case "code":
      return codeBlock(block.language, block.text);
    case "list": {
      const items = block.items.map((item) => h("li", {}, ...item.map(renderBlock)));
      return block.ordered
        ? h("ol", { start: block.start === 1 ? undefined : block.start }, ...items)
        : h("ul", {}, ...items);
    }
    case "quote":
      return h("blockquote", {}, ...block.children.map(renderBlock));
    case "rule":
      return h("hr");
  }
}

function renderInline(node: Inline): Node {
  switch (node.kind) {
    case "text":
      return document.createTextNode(node.text);
    case "code":
      return h("code", {}, node.text);
    case "strong":
      return h("strong", {}, ...node.children.map(renderInline));
    case "em":
      return h("em", {}, ...node.children.map(renderInline));
    case "link":
      return h(
        "a",
        { href: node.href, target: "_blank", rel: "noopener noreferrer nofollow" },
        ...node.children.map(renderInline),
      );
    case "break":
      return h("br");
  }
}

function codeBlock(language: string, text: string): Node {
  const label = language === "" ? "code" : language;
  const copy = h("button", { type: "button", class: "copy", "aria-label": `Copy ${label}` }, "Copy");
  copy.addEventListener("click", () => {
    void navigator.clipboard.writeText(text).then(
      () => (copy.textContent = "Copied"),
      () => (copy.textContent = "Copy failed"),
    );
  });
  return h(
    "figure",
    { class: "code-block" },
    h("figcaption", {}, h("span", {}, label), copy),
    // Focusable, so a keyboard can scroll a wide block.
    h("pre", { tabindex: 0 }, h("code", { class: language === "" ? undefined : `language-${language}` }, text)),
  );
}
