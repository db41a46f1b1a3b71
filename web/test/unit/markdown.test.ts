import assert from "node:assert/strict";
import { test } from "node:test";

import { parseInline, parseMarkdown, plainText, safeUrl, type Block, type Inline } from "../../src/app/markdown.js";

/** Every link destination anywhere in the tree. */
function hrefs(blocks: Block[]): string[] {
  const fromInline = (nodes: Inline[]): string[] =>
    nodes.flatMap((node) =>
      node.kind === "link" ? [node.href, ...fromInline(node.children)] : "children" in node ? fromInline(node.children) : [],
    );
  return blocks.flatMap((block): string[] => {
    switch (block.kind) {
      case "paragraph":
      case "heading":
        return fromInline(block.children);
      case "list":
        return block.items.flatMap(hrefs);
      case "quote":
        return hrefs(block.children);
      default:
        return [];
    }
  });
}

/** All the text of the tree, as the page would show it. */
function shown(blocks: Block[]): string {
  return blocks
    .map((block) => {
      switch (block.kind) {
        case "paragraph":
        case "heading":
          return plainText(block.children);
        case "code":
          return block.text;
        case "list":
          return block.items.map(shown).join("\n");
        case "quote":
          return shown(block.children);
        case "rule":
          return "";
      }
    })
    .join("\n");
}

test("HTML and script in a reply stay text; only http(s) links survive", () => {
  const attack =
    '<img src=x onerror="window.__pwned=1"> <script>window.__pwned=2</script> ' +
    "[click me](javascript:window.__pwned=3) [data](data:text/html,<b>x</b>) " +
    "[rel](/admin) [ok](https://example.com/a_(b)) <javascript:alert(1)> " +
    "[vb](JaVaScRiPt:alert(1)) [sp]( javascript:alert(1)) [ent](&#106;avascript:alert(1))";
  const blocks = parseMarkdown(attack);
  assert.deepEqual(hrefs(blocks), ["https://example.com/a_(b)"]);
  const text = shown(blocks);
  assert.ok(text.includes('<img src=x onerror="window.__pwned=1">'), text);
  assert.ok(text.includes("<script>window.__pwned=2</script>"), text);
  assert.ok(text.includes("[click me](javascript:window.__pwned=3)"), text);
  assert.ok(text.includes("<javascript:alert(1)>"), text);
});

test("safeUrl accepts absolute http(s) URLs only", () => {
  assert.equal(safeUrl("https://example.com"), "https://example.com/");
  assert.equal(safeUrl("HTTP://EXAMPLE.com/x?y#z"), "http://example.com/x?y#z");
  for (const bad of ["javascript:alert(1)", "data:text/html,x", "//evil.example", "/relative", "mailto:a@b", "https:", "ftp://x"]) {
    assert.equal(safeUrl(bad), null, bad);
  }
});

test("code blocks keep their text verbatim, and an unclosed fence runs to the end", () => {
  const blocks = parseMarkdown("Here:\n\n```rust\nfn main() {\n    println!(\"<b>*hi*</b>\");\n}\n```\nafter\n\n~~~\nstill streaming\n");
  assert.deepEqual(blocks, [
    { kind: "paragraph", children: [{ kind: "text", text: "Here:" }] },
    { kind: "code", language: "rust", text: 'fn main() {\n    println!("<b>*hi*</b>");\n}' },
    { kind: "paragraph", children: [{ kind: "text", text: "after" }] },
    { kind: "code", language: "", text: "still streaming\n" },
  ]);
});

test("headings, lists, quotes, rules and line breaks", () => {
  const blocks = parseMarkdown("# Title\n\n- one\n- two\n  - nested\n3. three\n\n> quoted\n> more\n\n---\nline one\nline two");
  assert.deepEqual(
    blocks.map((block) => block.kind),
    ["heading", "list", "list", "quote", "rule", "paragraph"],
  );
  const list = blocks[1] as Extract<Block, { kind: "list" }>;
  assert.equal(list.items.length, 2);
  assert.equal(list.items[1]?.[1]?.kind, "list", "an indented item nests");
  const ordered = blocks[2] as Extract<Block, { kind: "list" }>;
  assert.equal(ordered.ordered, true);
  assert.equal(ordered.start, 3);
  assert.deepEqual((blocks[5] as Extract<Block, { kind: "paragraph" }>).children, [
    { kind: "text", text: "line one" },
    { kind: "break" },
    { kind: "text", text: "line two" },
  ]);
});

test("inline code, emphasis, escapes and autolinks", () => {
  assert.deepEqual(parseInline("a `x <y>` **bold** *it* \\*not\\* snake_case_name"), [
    { kind: "text", text: "a " },
    { kind: "code", text: "x <y>" },
    { kind: "text", text: " " },
    { kind: "strong", children: [{ kind: "text", text: "bold" }] },
    { kind: "text", text: " " },
    { kind: "em", children: [{ kind: "text", text: "it" }] },
    { kind: "text", text: " *not* snake_case_name" },
  ]);
  assert.deepEqual(parseInline("see https://example.com/x."), [
    { kind: "text", text: "see " },
    { kind: "link", href: "https://example.com/x", children: [{ kind: "text", text: "https://example.com/x" }] },
    { kind: "text", text: "." },
  ]);
  assert.deepEqual(parseInline("2 * 3 * 4 and ** alone"), [{ kind: "text", text: "2 * 3 * 4 and ** alone" }]);
});

test("any text parses without throwing and loses no characters outside markup", () => {
  const alphabet = ["a", " ", "\n", "*", "_", "`", "[", "]", "(", ")", "<", ">", "#", "-", "\\", "😀", "h", "ttps://", ":"];
  let seed = 42;
  const random = (): number => {
    seed = (seed * 1103515245 + 12345) % 2 ** 31;
    return seed / 2 ** 31;
  };
  for (let round = 0; round < 2000; round++) {
    const length = Math.floor(random() * 40);
    let text = "";
    for (let i = 0; i < length; i++) text += alphabet[Math.floor(random() * alphabet.length)];
    const blocks = parseMarkdown(text);
    const letters = (value: string): number => [...value].filter((char) => char === "a" || char === "😀").length;
    assert.equal(letters(shown(blocks)), letters(text), JSON.stringify(text));
  }
});
