#!/usr/bin/env bash
# The size of ckptkit's public API: every item rustdoc documents for the
# default features (structs, enums, functions, traits, type aliases,
# constants, statics, macros; a module's items counted where they are
# reachable). Fails above the budget (issue "One seam per layout family":
# about 100 items), so growth is a decision, not an accident.
#
#   bash .ci/public-api.sh          # count, list with -v
#   LIMIT=120 bash .ci/public-api.sh
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT=${LIMIT:-100}

# rustdoc never deletes pages of items that stopped being public
rm -rf target/doc/ckptkit
cargo doc --no-deps --quiet

# rustdoc leaves small redirect pages at the private paths of re-exported
# items: only real pages count
items=$(find target/doc/ckptkit -name '*.html' -exec grep -L 'http-equiv="refresh"' {} + \
    | grep -E '/(struct|enum|fn|trait|type|constant|static|macro|union)\.[^/]+\.html$' \
    | sed -E 's#^target/doc/##; s#/(struct|enum|fn|trait|type|constant|static|macro|union)\.([^/]+)\.html$#::\2#; s#/#::#g' \
    | sort)
n=$(printf '%s\n' "$items" | grep -c .)
if [ "${1:-}" = -v ]; then
    printf '%s\n' "$items"
fi
echo "public API: $n items (budget $LIMIT)"
printf '%s\n' "$items" | sed -E 's#::[^:]+$##' | sort | uniq -c | sort -rn
if [ "$n" -gt "$LIMIT" ]; then
    echo "the public API grew past $LIMIT items: make internals pub(crate), or raise the budget on purpose" >&2
    exit 1
fi
