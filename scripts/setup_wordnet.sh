#!/usr/bin/env bash
# Offline WordNet 3.0 for NLTK's METEOR (`glmtune eval generate --metrics meteor`).
#
# Why this exists: `nltk.download("wordnet")` needs the internet. Debian ships the same WordNet 3.0
# database in `wordnet-base` (+ `wordnet-sense-index` for index.sense) under /usr/share/wordnet, but
#   * NLTK refuses symlinks and hardlinks that leave its data roots, so the files are COPIED;
#   * NLTK's reader opens a `lexnames` file the Debian package lacks; we generate it from the
#     lexnames(5WN) man page the package ships (or the fixed 45-name list if the page is missing).
# omw-1.4 / omw-2.0 (multilingual WordNet) is NOT needed: NLTK loads it lazily, only for lang != "eng",
# and METEOR looks up English synsets only.
#
# Idempotent: re-running is a no-op once the folder is complete.
# Usage: bash scripts/setup_wordnet.sh [NLTK_DATA_DIR]   (default: $NLTK_DATA's first entry, else ~/nltk_data)
set -euo pipefail

SRC=/usr/share/wordnet
DEST_ROOT="${1:-${NLTK_DATA:-$HOME/nltk_data}}"
DEST_ROOT="${DEST_ROOT%%:*}"           # NLTK_DATA may be a PATH-like list; use its first entry
DEST="$DEST_ROOT/corpora/wordnet"
FILES="cntlist.rev index.sense index.adj index.adv index.noun index.verb data.adj data.adv data.noun
data.verb adj.exc adv.exc noun.exc verb.exc"

complete() {
  local f
  for f in $FILES lexnames; do [ -s "$DEST/$f" ] || return 1; done
  [ "$(wc -l < "$DEST/lexnames")" -eq 45 ]
}

if complete; then
  echo "setup_wordnet: $DEST already complete"
  exit 0
fi

if [ ! -s "$SRC/data.noun" ] || [ ! -s "$SRC/index.sense" ]; then
  echo "setup_wordnet: installing Debian packages wordnet-base wordnet-sense-index"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get install -y --no-install-recommends wordnet-base wordnet-sense-index \
    || { $SUDO apt-get update && $SUDO apt-get install -y --no-install-recommends wordnet-base wordnet-sense-index; }
fi

mkdir -p "$DEST"
for f in $FILES; do
  # cp --remove-destination replaces any earlier symlink attempt with a real file
  cp --remove-destination "$SRC/$f" "$DEST/$f"
done

# lexnames: "NN<TAB>name<TAB>syntactic category" (1 noun, 2 verb, 3 adj, 4 adv), 45 lines, numbered 00..44.
MAN=/usr/share/man/man5/lexnames.5WN.gz
names=""
if [ -s "$MAN" ]; then
  names="$(zcat "$MAN" | awk -F'\t' '/^[0-9][0-9]\t[a-z]+\.[A-Za-z]+/ {gsub(/ +/, "", $2); print $1 "\t" $2}')"
fi
if [ "$(printf '%s\n' "$names" | grep -c .)" -ne 45 ]; then
  # The fixed WordNet 3.0 list (lexnames(5WN)); used when the man page is absent (e.g. --no-man images).
  names="$(printf '%s\n' adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact \
    noun.attribute noun.body noun.cognition noun.communication noun.event noun.feeling noun.food \
    noun.group noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant \
    noun.possession noun.process noun.quantity noun.relation noun.shape noun.state noun.substance \
    noun.time verb.body verb.change verb.cognition verb.communication verb.competition \
    verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception \
    verb.possession verb.social verb.stative verb.weather adj.ppl | awk '{printf "%02d\t%s\n", NR-1, $1}')"
fi
printf '%s\n' "$names" | awk -F'\t' '
  { split($2, p, "."); cat = (p[1]=="noun") ? 1 : (p[1]=="verb") ? 2 : (p[1]=="adj") ? 3 : 4
    printf "%s\t%s\t%d\n", $1, $2, cat }' > "$DEST/lexnames.tmp"
mv "$DEST/lexnames.tmp" "$DEST/lexnames"

complete || { echo "setup_wordnet: $DEST is incomplete after setup" >&2; exit 1; }
echo "setup_wordnet: WordNet 3.0 ready in $DEST (NLTK finds it via ~/nltk_data or NLTK_DATA=$DEST_ROOT)"
