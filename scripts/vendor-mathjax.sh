#!/usr/bin/env bash
# Rewrite book/_static/mathjax, the MathJax the book ships so that maths renders without a network:
# the combined TeX-to-CommonHTML component (all TeX extensions, no lazy loading), its WOFF fonts and
# the licence, from the npm package at the pinned version. Needs npm; the result is committed.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${MATHJAX_VERSION:-3.2.2}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "mathjax@$VERSION" >/dev/null && tar xzf "mathjax-$VERSION.tgz")
target=book/_static/mathjax
rm -rf "$target"
mkdir -p "$target/output/chtml/fonts"
cp "$work/package/es5/tex-chtml-full.js" "$work/package/LICENSE" "$target/"
cp -r "$work/package/es5/output/chtml/fonts/woff-v2" "$target/output/chtml/fonts/"
echo "MathJax $VERSION (npm package mathjax, es5/tex-chtml-full.js and its CommonHTML fonts)" > "$target/VERSION"
du -sh "$target"
