"""Taxonomy harmonisation: one feature per taxon, whichever pipeline named it.

Labs classify reads against different references, and the same genus comes out spelled
differently: SILVA 132 (`D_5__Blautia`), SILVA 138 and Greengenes2 (`g__Blautia`), GTDB
(`g__Blautia_A`, renamed phyla such as `p__Bacillota`), MetaPhlAn (`k__Bacteria|...|g__Blautia`,
NCBI names). Higher ranks differ between references too (a genus sits in a different order in
SILVA 132 and GTDB), so a taxon is matched by its rank and name, never by its whole lineage:
`taxon_key` is what the model aligns on; `lineage_at_rank` is the readable name it reports.
The synonym tables are the documented part of the mapping (docs/data-format.md).
"""

from __future__ import annotations

import re
from functools import lru_cache

from training.schema import RANK_PREFIXES, RANKS, is_taxon

# SILVA 132 and older write the rank as a level number.
SILVA_LEVELS: dict[str, str] = {f"d_{i}": rank for i, rank in enumerate(RANKS)}
# Phylum names that changed between references -> the spelling the features use (SILVA 138,
# the simulator's). GTDB letter suffixes (Firmicutes_A) are removed before this lookup.
PHYLUM_SYNONYMS: dict[str, str] = {
    "Bacillota": "Firmicutes",
    "Bacteroidetes": "Bacteroidota",
    "Pseudomonadota": "Proteobacteria",
    "Actinobacteria": "Actinobacteriota",
    "Actinomycetota": "Actinobacteriota",
    "Verrucomicrobia": "Verrucomicrobiota",
    "Fusobacteria": "Fusobacteriota",
    "Spirochaetes": "Spirochaetota",
    "Synergistetes": "Synergistota",
    "Elusimicrobia": "Elusimicrobiota",
    "Lentisphaerae": "Lentisphaerota",
    "Tenericutes": "Firmicutes",
    "Mycoplasmatota": "Firmicutes",
    "Campylobacterota": "Campilobacterota",
    "Thermodesulfobacteriota": "Desulfobacterota",
    "Cyanobacteriota": "Cyanobacteria",
    "Methanobacteriota": "Euryarchaeota",
}
# Genus renames between NCBI (MetaPhlAn 3) and GTDB/SILVA 138 for common gut genera.
GENUS_SYNONYMS: dict[str, str] = {
    "Escherichia-Shigella": "Escherichia",  # SILVA
    "Clostridium_sensu_stricto_1": "Clostridium",  # SILVA 138
}
# Names that say "no name": the lineage stops at the parent, as an unclassified read does.
PLACEHOLDERS = re.compile(
    r"^(unassigned|uncultured|unidentified|unknown|unclassified|metagenome|gut_metagenome|"
    r"human_gut_metagenome|ambiguous_taxa|incertae_sedis)([ _].*)?$|.*_unclassified$",
    re.IGNORECASE)
# GTDB's letter suffixes mark its splits of one genus or phylum (Blautia_A, Firmicutes_A);
# the other references keep one name for all of them, so across references the split maps
# back onto it. Roman numerals are not GTDB suffixes but RDP clusters (Clostridium_IV) or
# numbered families (Family_XI), distinct taxa that keep their names.
GTDB_SUFFIX = re.compile(r"^([A-Z][a-z]+)_(?![IVXL]+(?:_|$))[A-Z]{1,2}(?=_|$)")
UNASSIGNED = re.compile(r"^\s*(unassigned|unclassified|unknown|no hit|none)?\s*$",
                        re.IGNORECASE)


def _name(rank: str, raw: str) -> str:
    """Canonical spelling of one rank's name, or '' when it is a placeholder."""
    name = raw.strip().strip("[]'\"").replace("[", "").replace("]", "").replace(" ", "_")
    if not name or PLACEHOLDERS.match(name):
        return ""
    name = GTDB_SUFFIX.sub(r"\1", name)
    if rank == "phylum":
        return PHYLUM_SYNONYMS.get(name, name)
    if rank == "genus":
        return GENUS_SYNONYMS.get(name, name)
    return name


@lru_cache(maxsize=4096)  # bounded: the service parses lineages clients send
def parse_lineage(taxon: str) -> tuple[tuple[str, str], ...]:
    """(rank, canonical name) pairs down the lineage; strains and unnamed or placeholder
    ranks dropped (a read unclassified at genus stays at its family)."""
    parts: list[tuple[str, str]] = []
    for part in re.split(r"[;|]", taxon):
        prefix, separator, raw = part.strip().partition("__")
        if not separator:
            continue
        prefix = prefix.lower()
        rank = RANK_PREFIXES.get(prefix) or SILVA_LEVELS.get(prefix)
        if rank is None or rank == "strain":
            continue
        name = _name(rank, raw)
        if name and rank == "species" and not name[0].isupper():
            # an epithet alone (Greengenes' s__hominis) names nothing without its genus
            genus = next((n for r, n in parts if r == "genus"), "")
            name = f"{genus}_{name}" if genus else ""
        if name:
            parts.append((rank, name))
    return tuple(parts)


def is_unassigned(taxon: str) -> bool:
    """An empty id, 'Unassigned' (also as the head of a padded lineage, as QIIME 2 collapses
    it: `Unassigned;__;__`), MetaPhlAn's UNKNOWN, or a lineage with no named rank."""
    head = re.split(r"[;|]", taxon, maxsplit=1)[0]
    return (bool(UNASSIGNED.match(head)) and not parse_lineage(taxon)) or (
        is_taxon(taxon) and not parse_lineage(taxon))


def _truncated(taxon: str, rank: str) -> tuple[tuple[str, str], ...]:
    depth = RANKS.index(rank)
    return tuple(p for p in parse_lineage(taxon) if RANKS.index(p[0]) <= depth)


@lru_cache(maxsize=4096)  # bounded: the service parses lineages clients send
def lineage_at_rank(taxon: str, rank: str = "genus") -> str:
    """Readable canonical lineage truncated at `rank`: `d__A;p__B;...;g__G`.

    Lineages that stop above `rank` keep their deepest named level, which is how
    "unclassified Lachnospiraceae" stays its own feature.
    """
    return ";".join(f"{RANK_PREFIXES_OUT[r]}__{n}" for r, n in _truncated(taxon, rank))


@lru_cache(maxsize=4096)  # bounded: the service parses lineages clients send
def taxon_key(taxon: str, rank: str = "genus") -> str:
    """What two spellings of one taxon share at `rank`: its deepest named rank and name
    (`g__Blautia`), independent of the reference's higher ranks."""
    parts = _truncated(taxon, rank)
    if not parts:
        return ""
    level, name = parts[-1]
    return f"{RANK_PREFIXES_OUT[level]}__{name}"


RANK_PREFIXES_OUT: dict[str, str] = {rank: rank[0] for rank in RANKS}
# Feature ranks that stand for several taxonomic ranks side by side, coarsest first: a
# species-level profile carries both the genus signal (pooled over species, robust to their
# naming) and the species one (strain-level biology a genus sum averages away).
RANK_SETS: dict[str, tuple[str, ...]] = {"both": ("genus", "species")}


def levels(rank: str) -> tuple[str, ...]:
    """The taxonomic ranks a feature rank holds, coarsest first."""
    return RANK_SETS.get(rank, (rank,))


@lru_cache(maxsize=4096)  # bounded: the service parses lineages clients send
def taxon_features(taxon: str, rank: str = "genus") -> tuple[tuple[str, str], ...]:
    """(key, readable lineage) of every feature one taxon's reads count towards at `rank`.

    One rank: its `taxon_key`. Several (`both`): its key at the coarsest rank, plus its key
    at each finer rank it is named at, so a species' reads count for its genus and for
    itself, and a read unnamed at species for its genus only (never twice for one genus).
    """
    ranks = levels(rank)
    features = []
    for depth, level in enumerate(ranks):
        key = taxon_key(taxon, level)
        if key and (depth == 0 or key.startswith(f"{RANK_PREFIXES_OUT[level]}__")):
            features.append((key, lineage_at_rank(taxon, level)))
    return tuple(features)
