#!/usr/bin/env sh
# Point every alert's runbook_url at your copy of docs/runbook.md:
#   deploy/prometheus/set-runbook-base.sh https://wiki.example.com/backfill/runbook
# The base is written once, in the "# runbook base:" line at the top of rules.yml; every
# runbook_url is that base + "#" + the alert's name in lower case (the runbook's headings).
# Rewrites rules.yml and tests.yml in place, so `promtool test rules tests.yml` still passes.
set -eu
new=${1:?usage: set-runbook-base.sh https://host/path/to/runbook}
case $new in
  http://*|https://*) ;;
  *) echo "set-runbook-base.sh: the base must be an absolute http(s) URL, not $new" >&2; exit 2 ;;
esac
case $new in
  *'#'*|*'|'*|*'"'*|*' '*) echo "set-runbook-base.sh: no '#', '|', quote or space in the base" >&2; exit 2 ;;
esac
dir=$(dirname "$0")
old=$(sed -n 's/^# runbook base: *//p' "$dir/rules.yml")
[ -n "$old" ] || { echo "set-runbook-base.sh: no '# runbook base:' line in rules.yml" >&2; exit 1; }
for f in "$dir/rules.yml" "$dir/tests.yml"; do
  sed -i "s|^# runbook base: .*|# runbook base: $new|; s|\"$old#|\"$new#|g" "$f"
done
echo "runbook_url base: $old -> $new"
