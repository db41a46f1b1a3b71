/**
 * A small Markdown reader for model replies. It turns text into a tree of
 * plain data (never HTML): the renderer builds DOM nodes from the tree with
 * `textContent`, so nothing the model writes is ever parsed as HTML. Raw
 * HTML in the text stays text. Links keep their destination only when it is
 * an absolute http(s) URL; any other link is shown as the text it was.
 *
 * Supported: paragraphs (single newlines kept as line breaks), ATX headings,
 * fenced code blocks (an unclosed fence runs to the end, as a reply still
 * streaming has it), indented lists (ordered and not), block quotes,
 * thematic breaks, code spans, strong and emphasis, links, autolinks
 * `<https://…>` and bare http(s) URLs, backslash escapes.
 */

export type Inline =
  | { kind: "text"; text: string }
  | { kind: "code"; text: string }
  | { kind: "strong"; children: Inline[] }
  | { kind: "em"; children: Inline[] }
  | { kind: "link"; href: string; children: Inline[] }
  | { kind: "break" };

export type Block =
  | { kind: "paragraph"; children: Inline[] }
  | { kind: "heading"; level: number; children: Inline[] }
  | { kind: "code"; language: string; text: string }
  | { kind: "list"; ordered: boolean; start: number; items: Block[][] }
  | { kind: "quote"; children: Block[] }
  | { kind: "rule" };

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
const QUOTE = /^ {0,3}> ?(.*)$/;
const LIST_ITEM = /^( {0,3})([-*+]|(\d{1,9})[.)])([ \t]+(.*)|[ \t]*$)/;
const BLANK = /^[ \t]*$/;

export function parseMarkdown(text: string): Block[] {
  return parseBlocks(text.replace(/\r\n?/g, "\n").split("\n"));
}

function parseBlocks(lines: string[]): Block[] {
  const blocks: Block[] = [];
  let index = 0;
  while (index < lines.length) {
    const line = lines[index] as string;
    if (BLANK.test(line)) {
      index++;
      continue;
    }
    const fence = FENCE.exec(line);
    if (fence) {
      const marker = fence[1] as string;
      const body: string[] = [];
      index++;
      while (index < lines.length && !isClosingFence(lines[index] as string, marker)) {
        body.push(lines[index] as string);
        index++;
      }
      index++; // the closing fence (or past the end)
      blocks.push({ kind: "code", language: fence[2] ?? "", text: body.join("\n") });
      continue;
    }
    const heading = HEADING.exec(line);
    if (heading) {
      blocks.push({
        kind: "heading",
        level: (heading[1] as string).length,
        children: parseInline(heading[2] ?? ""),
      });
      index++;
      continue;
    }
    if (RULE.test(line)) {
      blocks.push({ kind: "rule" });
      index++;
      continue;
    }
    if (QUOTE.test(line)) {
      const quoted: string[] = [];
      while (index < lines.length) {
        const match = QUOTE.exec(lines[index] as string);
        if (!match) break;
        quoted.push(match[1] as string);
        index++;
      }
      blocks.push({ kind: "quote", children: parseBlocks(quoted) });
      continue;
    }
    const item = LIST_ITEM.exec(line);
    if (item) {
      index = parseList(lines, index, blocks);
      continue;
    }
    const paragraph: string[] = [];
    while (index < lines.length) {
      const next = lines[index] as string;
      if (BLANK.test(next) || startsBlock(next)) break;
      paragraph.push(next.trim());
      index++;
    }
    blocks.push({ kind: "paragraph", children: parseInline(paragraph.join("\n")) });
  }
  return blocks;
}

function startsBlock(line: string): boolean {
  return (
    FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || LIST_ITEM.test(line)
  );
}

function isClosingFence(line: string, opening: string): boolean {
  const trimmed = line.trim();
  const char = opening[0] as string;
  return (
    trimmed.length >= opening.length &&
    [...trimmed].every((c) => c === char) &&
    line.length - line.trimStart().length <= 3
  );
}

/** A list starting at `start`; returns the index after it. */
function parseList(lines: string[], start: number, blocks: Block[]): number {
  const first = LIST_ITEM.exec(lines[start] as string) as RegExpExecArray;
  const ordered = first[3] !== undefined;
  const items: Block[][] = [];
  let index = start;
  while (index < lines.length) {
    const match = LIST_ITEM.exec(lines[index] as string);
    if (!match || (match[3] !== undefined) !== ordered) break;
    const indent = (match[1] as string).length + (match[2] as string).length + 1;
    const content = [match[5] ?? ""];
    index++;
    // Continuation: indented lines, and blank lines followed by indented ones.
    while (index < lines.length) {
      const next = lines[index] as string;
      if (BLANK.test(next)) {
        const following = lines[index + 1];
        if (following !== undefined && indentOf(following) >= indent && !BLANK.test(following)) {
          content.push("");
          index++;
          continue;
        }
        break;
      }
      if (indentOf(next) >= Math.min(indent, 4)) {
        content.push(next.slice(Math.min(indentOf(next), indent)));
        index++;
        continue;
      }
      if (startsBlock(next)) break;
      content.push(next.trim()); // a lazy continuation of the item's paragraph
      index++;
    }
    items.push(parseBlocks(content));
  }
  blocks.push({ kind: "list", ordered, start: ordered ? Number(first[3]) : 1, items });
  return index;
}

function indentOf(line: string): number {
  return line.length - line.trimStart().length;
}

const ESCAPABLE = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";

/**
 * What an inline parse has learnt about its text: where no closer exists
 * from some position on. Without it, text like `*a *a *a …` would make
 * every opener search to the end (quadratic time, re-run on every frame of
 * a streaming reply).
 */
interface Scan {
  /** Delimiter (`*`, `**`, `_`, `__`) → a position from which it has no valid closer. */
  noEmphasisCloser: Map<string, number>;
  /** Backtick run length → a position from which no run of that length follows. */
  noCodeCloser: Map<number, number>;
}

/** Longest link label and destination looked for (keeps bad input linear). */
const MAX_LABEL = 1000;
const MAX_DESTINATION = 2048;

/** Inline content of one block. */
export function parseInline(text: string): Inline[] {
  return parseInlineScanned(text, { noEmphasisCloser: new Map(), noCodeCloser: new Map() });
}

function parseInlineScanned(text: string, scan: Scan): Inline[] {
  const out: Inline[] = [];
  let plain = "";
  const flush = (): void => {
    if (plain !== "") {
      pushText(out, plain);
      plain = "";
    }
  };
  let index = 0;
  while (index < text.length) {
    const char = text[index] as string;
    if (char === "\\" && index + 1 < text.length && ESCAPABLE.includes(text[index + 1] as string)) {
      plain += text[index + 1];
      index += 2;
      continue;
    }
    if (char === "\n") {
      flush();
      out.push({ kind: "break" });
      index++;
      continue;
    }
    if (char === "`") {
      const run = runLength(text, index, "`");
      const close = findCodeCloser(text, index + run, run, scan);
      if (close !== -1) {
        flush();
        let code = text.slice(index + run, close).replace(/\n/g, " ");
        if (code.length > 2 && code.startsWith(" ") && code.endsWith(" ")) code = code.slice(1, -1);
        out.push({ kind: "code", text: code });
        index = close + run;
        continue;
      }
      plain += text.slice(index, index + run);
      index += run;
      continue;
    }
    if (char === "*" || char === "_") {
      const emphasis = parseEmphasis(text, index, scan);
      if (emphasis) {
        flush();
        out.push(emphasis.node);
        index = emphasis.end;
        continue;
      }
      const run = runLength(text, index, char);
      plain += text.slice(index, index + run);
      index += run;
      continue;
    }
    if (char === "[") {
      const link = parseLink(text, index);
      if (link) {
        flush();
        out.push(link.node);
        index = link.end;
        continue;
      }
    }
    if (char === "<") {
      const close = text.indexOf(">", index);
      const url = close === -1 ? null : safeUrl(text.slice(index + 1, close));
      if (url !== null && !/\s/.test(text.slice(index + 1, close))) {
        flush();
        out.push({ kind: "link", href: url, children: [{ kind: "text", text: text.slice(index + 1, close) }] });
        index = close + 1;
        continue;
      }
    }
    if ((char === "h" || char === "H") && (index === 0 || /[\s(]/.test(text[index - 1] as string))) {
      const bare = /^https?:\/\/[^\s<>]+/i.exec(text.slice(index));
      if (bare) {
        // Trailing punctuation ends the sentence, not the URL.
        const raw = bare[0].replace(/[.,;:!?'")\]]+$/, "");
        const url = safeUrl(raw);
        if (url !== null) {
          flush();
          out.push({ kind: "link", href: url, children: [{ kind: "text", text: raw }] });
          index += raw.length;
          continue;
        }
      }
    }
    plain += char;
    index++;
  }
  flush();
  return out;
}

function pushText(out: Inline[], text: string): void {
  const last = out[out.length - 1];
  if (last?.kind === "text") last.text += text;
  else out.push({ kind: "text", text });
}

function runLength(text: string, index: number, char: string): number {
  let end = index;
  while (text[end] === char) end++;
  return end - index;
}

/** The index of the next run of exactly `length` backticks at or after `from`. */
function findCodeCloser(text: string, from: number, length: number, scan: Scan): number {
  const none = scan.noCodeCloser.get(length);
  if (none !== undefined && from >= none) return -1;
  let index = text.indexOf("`", from);
  while (index !== -1) {
    const run = runLength(text, index, "`");
    if (run === length) return index;
    index = text.indexOf("`", index + run);
  }
  scan.noCodeCloser.set(length, Math.min(from, none ?? from));
  return -1;
}

function parseEmphasis(text: string, index: number, scan: Scan): { node: Inline; end: number } | null {
  const char = text[index] as string;
  const run = Math.min(runLength(text, index, char), 2);
  const after = text[index + run];
  if (after === undefined || /\s/.test(after)) return null;
  // `_` inside a word (snake_case) is not emphasis.
  if (char === "_" && index > 0 && /[\p{L}\p{N}]/u.test(text[index - 1] as string)) return null;
  const delimiter = char.repeat(run);
  const from = index + run;
  // Whether a position closes does not depend on the opener, so a search
  // that found none from `from` on holds for every later opener too.
  const none = scan.noEmphasisCloser.get(delimiter);
  if (none !== undefined && from >= none) return null;
  let search = from;
  for (;;) {
    const close = search < text.length ? text.indexOf(delimiter, search) : -1;
    if (close === -1) {
      scan.noEmphasisCloser.set(delimiter, Math.min(from, none ?? from));
      return null;
    }
    const before = text[close - 1] as string;
    const next = text[close + run];
    const closes =
      close > from &&
      !/\s/.test(before) &&
      (char === "*" || next === undefined || !/[\p{L}\p{N}]/u.test(next)) &&
      // `**` inside `*…*` is not the closing single delimiter.
      (run === 2 || text[close + 1] !== char || text[close - 1] === char);
    if (closes) {
      const inner = parseInline(text.slice(index + run, close));
      return {
        node: run === 2 ? { kind: "strong", children: inner } : { kind: "em", children: inner },
        end: close + run,
      };
    }
    search = close + run;
  }
}

function parseLink(text: string, index: number): { node: Inline; end: number } | null {
  // The label: up to the matching `]` (nested brackets balanced).
  let depth = 0;
  let labelEnd = -1;
  for (let i = index; i < Math.min(text.length, index + MAX_LABEL); i++) {
    const char = text[i];
    if (char === "\\") {
      i++;
      continue;
    }
    if (char === "[") depth++;
    if (char === "]") {
      depth--;
      if (depth === 0) {
        labelEnd = i;
        break;
      }
    }
  }
  if (labelEnd === -1 || text[labelEnd + 1] !== "(") return null;
  // The destination: up to the matching `)`, parentheses balanced.
  let parens = 0;
  let destinationEnd = -1;
  for (let i = labelEnd + 1; i < Math.min(text.length, labelEnd + 1 + MAX_DESTINATION); i++) {
    const char = text[i];
    if (char === "\\") {
      i++;
      continue;
    }
    if (char === "(") parens++;
    if (char === ")") {
      parens--;
      if (parens === 0) {
        destinationEnd = i;
        break;
      }
    }
  }
  if (destinationEnd === -1) return null;
  const inside = text.slice(labelEnd + 2, destinationEnd).trim();
  // An optional title after the URL is dropped.
  const destination = inside.replace(/\s+("[^"]*"|'[^']*')$/, "").replace(/^<(.*)>$/, "$1");
  const href = safeUrl(destination);
  if (href === null) return null; // shown as the text it was
  return {
    node: { kind: "link", href, children: parseInline(text.slice(index + 1, labelEnd)) },
    end: destinationEnd + 1,
  };
}

/** `text` as an absolute http(s) URL, or `null` (javascript:, data:, relative…). */
export function safeUrl(text: string): string | null {
  if (!/^https?:\/\//i.test(text)) return null;
  try {
    const url = new URL(text);
    return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
  } catch {
    return null;
  }
}

/** The text of inline nodes without formatting (for labels and titles). */
export function plainText(nodes: Inline[]): string {
  return nodes
    .map((node) => {
      switch (node.kind) {
        case "text":
        case "code":
          return node.text;
        case "break":
          return "\n";
        default:
          return plainText(node.children);
      }
    })
    .join("");
}
