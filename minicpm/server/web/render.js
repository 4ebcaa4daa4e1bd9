// Model output to the page: Markdown rendered by marked, sanitized by DOMPurify, code highlighted by
// highlight.js (all three vendored, loaded as classic scripts before this module runs).
//
// Contract: model output is text, never markup that runs. Raw HTML in an answer is shown as text (the
// Markdown renderer escapes it); what Markdown itself produces then goes through DOMPurify with a
// short list of allowed tags: no script, no event-handler attribute, no javascript: or data: link,
// no image or other element that would load something on its own. Links open in a new tab without
// a referrer.

const { marked, DOMPurify, hljs } = window;

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

const markdown = new marked.Marked({
  gfm: true,
  breaks: false,
  renderer: {
    html(token) {
      return escapeHtml(token.text); // raw HTML in an answer is text, shown as written
    },
    image(token) {
      // no image loads by itself: a link the reader may follow instead
      return `<a href="${escapeHtml(token.href || "")}">${escapeHtml(`image: ${token.text || token.href || ""}`)}</a>`;
    },
  },
});

const ALLOWED_TAGS = [
  "a", "p", "br", "hr", "strong", "em", "del", "s", "code", "pre", "blockquote", "ul", "ol", "li",
  "h1", "h2", "h3", "h4", "h5", "h6", "table", "thead", "tbody", "tr", "th", "td", "span",
];
const ALLOWED_ATTR = ["href", "title", "class", "align", "start"];
const SAFE_URL = /^(?:https?:|mailto:|#|\/(?!\/))/i;

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    const href = node.getAttribute("href");
    if (href !== null && !SAFE_URL.test(href.trim())) node.removeAttribute("href");
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});

/** Markdown text to sanitized HTML (a string safe to assign to innerHTML). */
export function toSafeHtml(text) {
  const html = markdown.parse(text, { async: false });
  return DOMPurify.sanitize(html, { ALLOWED_TAGS, ALLOWED_ATTR });
}

/** Render ``text`` into ``element``; ``final`` also highlights code blocks (skipped while streaming). */
export function renderMarkdown(element, text, final = true) {
  element.innerHTML = toSafeHtml(text);
  if (!final) return;
  for (const block of element.querySelectorAll("pre code")) {
    const language = [...block.classList].find((c) => c.startsWith("language-"))?.slice(9);
    if (language && !hljs.getLanguage(language)) continue; // an unknown language stays plain
    hljs.highlightElement(block);
  }
}
