#!/usr/bin/env bash
# Refresh the chat page's vendored npm libraries (minicpm/server/web/vendor/) from the npm registry:
# the pinned versions below, their built (minified) browser files and their licenses, and a manifest
# (vendor/VERSIONS.txt) recording each package's version and each file's sha256.
# Change a version here, run this script, check the page (tests/test_web*.py), commit the result.
# Needs npm (the registry only; nothing is built from source).
set -euo pipefail

MARKED=18.3.0            # Markdown to HTML
DOMPURIFY=3.5.0          # sanitizing that HTML
HIGHLIGHT=11.12.0        # code highlighting (@highlightjs/cdn-assets: highlight.js's browser build)
PDFJS=6.5.438            # PDF text (pdfjs-dist's legacy build: older browsers too; module + worker)

root="$(cd "$(dirname "$0")/.." && pwd)"
vendor="$root/minicpm/server/web/vendor"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

cd "$work"
npm init -y >/dev/null
npm install --silent --no-audit --no-fund --ignore-scripts --no-package-lock \
  "marked@$MARKED" "dompurify@$DOMPURIFY" "@highlightjs/cdn-assets@$HIGHLIGHT" "pdfjs-dist@$PDFJS"
nm="$work/node_modules"

rm -rf "$vendor"
mkdir -p "$vendor"/{marked,dompurify,highlight,pdfjs}

# copy SRC DEST: a built file without its source-map comment (the maps are not vendored)
copy() { sed -e '/^\/\/# sourceMappingURL=/d' -e 's|//# sourceMappingURL=[^ ]*$||' "$1" >"$2"; }

copy "$nm/marked/lib/marked.umd.js" "$vendor/marked/marked.umd.js"
cp "$nm/marked/LICENSE" "$vendor/marked/LICENSE"

copy "$nm/dompurify/dist/purify.min.js" "$vendor/dompurify/purify.min.js"
cp "$nm/dompurify/LICENSE" "$vendor/dompurify/LICENSE"

copy "$nm/@highlightjs/cdn-assets/highlight.min.js" "$vendor/highlight/highlight.min.js"
copy "$nm/@highlightjs/cdn-assets/styles/github.min.css" "$vendor/highlight/github.min.css"
copy "$nm/@highlightjs/cdn-assets/styles/github-dark.min.css" "$vendor/highlight/github-dark.min.css"
cp "$nm/@highlightjs/cdn-assets/LICENSE" "$vendor/highlight/LICENSE"

copy "$nm/pdfjs-dist/legacy/build/pdf.min.mjs" "$vendor/pdfjs/pdf.min.mjs"
copy "$nm/pdfjs-dist/legacy/build/pdf.worker.min.mjs" "$vendor/pdfjs/pdf.worker.min.mjs"
cp "$nm/pdfjs-dist/LICENSE" "$vendor/pdfjs/LICENSE"

{
  echo "# Written by scripts/refresh_web_vendor.sh: npm package, version, then each vendored file's sha256."
  echo "marked $MARKED"
  echo "dompurify $DOMPURIFY"
  echo "@highlightjs/cdn-assets $HIGHLIGHT"
  echo "pdfjs-dist $PDFJS"
  echo
  (cd "$vendor" && find . -type f ! -name VERSIONS.txt | sort | xargs sha256sum)
} >"$vendor/VERSIONS.txt"
du -sh "$vendor"
