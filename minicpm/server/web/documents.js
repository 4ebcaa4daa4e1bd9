// Attached documents: the text of a .txt, .md or .pdf file, read in the browser.
//
// Contract: readDocument(file) resolves to {name, text} or rejects with an Error whose message can be
// shown as is. Plain text is decoded as UTF-8; a PDF's text comes from pdf.js (vendored, its module
// and worker loaded from this server the first time a PDF is attached), page by page, pages
// separated by a blank line. A PDF with no text layer (a scan) is an error, not an empty document.
// documentBlock(doc) is how a document enters the conversation: the model sees its name and text.

const TEXT_TYPES = /\.(txt|md|markdown|text)$/i;
const MAX_BYTES = 64 * 1024 * 1024;
let pdfjs = null;

async function loadPdfJs() {
  if (pdfjs === null) {
    pdfjs = await import("./vendor/pdfjs/pdf.min.mjs");
    pdfjs.GlobalWorkerOptions.workerSrc = new URL("./vendor/pdfjs/pdf.worker.min.mjs", import.meta.url).href;
  }
  return pdfjs;
}

async function pdfText(file) {
  const lib = await loadPdfJs();
  const task = lib.getDocument({ data: new Uint8Array(await file.arrayBuffer()), isEvalSupported: false });
  const pdf = await task.promise;
  try {
    const pages = [];
    for (let n = 1; n <= pdf.numPages; n++) {
      const page = await pdf.getPage(n);
      const content = await page.getTextContent();
      let text = "";
      for (const item of content.items) {
        if (typeof item.str !== "string") continue;
        text += item.str + (item.hasEOL ? "\n" : "");
      }
      pages.push(text.trim());
      page.cleanup();
    }
    return pages.join("\n\n");
  } finally {
    await task.destroy(); // ends the worker's copy of the document too
  }
}

/** The text of one attached file. */
export async function readDocument(file) {
  if (file.size > MAX_BYTES) throw new Error(`${file.name}: ${(file.size / 2 ** 20).toFixed(0)} MiB is too large`);
  const isPdf = /\.pdf$/i.test(file.name) || file.type === "application/pdf";
  if (!isPdf && !TEXT_TYPES.test(file.name) && !file.type.startsWith("text/")) {
    throw new Error(`${file.name}: only .txt, .md and .pdf files can be attached`);
  }
  let text;
  if (isPdf) {
    try {
      text = await pdfText(file);
    } catch (err) {
      throw new Error(`${file.name}: could not read this PDF (${err.message || err})`);
    }
  } else {
    text = new TextDecoder("utf-8").decode(await file.arrayBuffer());
  }
  if (!text.trim()) throw new Error(`${file.name}: no text found${isPdf ? " (a scanned PDF has none)" : ""}`);
  return { name: file.name, text };
}

/** A document as the model reads it, before the question. */
export function documentBlock(doc) {
  return `<document name="${doc.name.replace(/"/g, "'")}">\n${doc.text.trim()}\n</document>`;
}
