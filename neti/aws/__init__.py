"""EC2, the boto3 way: credentials and region from the default chain, never from neti.yml.

- ``ec2.py``: the EC2 client (bounded timeouts, one clear error line), instances parsed into
  ``Instance`` values;
- ``tagger.py``: this instance tagged with its overlay IP and agent version, in the background;
- ``tags.py``: those tags read back (``neti fleet restore-claims --from-tags``);
- ``fleetops.py``: what ``neti fleet audit``, ``ip-report`` and ``gc`` decide from EC2 and the
  registry's fleet.
"""
