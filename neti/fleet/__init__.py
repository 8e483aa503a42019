"""The fleet: live members as typed values, parsed and judged strictly. Pure; no ZooKeeper.

- ``model.py``: ``Member`` and ``Fleet`` (what everything downstream consumes), the skip
  reasons and their tally;
- ``addr.py``: the address and label rules, the one module of address predicates;
- ``names.py``: member node names (v1 and v2), encoded and decoded;
- ``legacy.py``: the original Neti's party node names under ``ip-map``;
- ``screen.py``: the reader's rules: one listed name screened (``screen``), and the children
  lists of ``members`` and ``ip-map`` turned into one ``Fleet`` (``build_fleet``);
- ``index.py``: ``FleetIndex``, the same fleet kept from name changes, and ``FleetChange``;
- ``wgkey.py``: a WireGuard public key's text form, checked strictly (what a record carries).

What only ZooKeeper can tell (is a node ephemeral, is its overlay IP claimed by it) is asked
through a verifier the caller passes in (neti.registry.verify.Verifier).
"""
