import pytest

pytestmark = pytest.mark.zk


def test_zookeeper_fixture_serves_real_requests(zk_client, zk_prefix):
    zk_client.create(zk_prefix + "/x", b"1", makepath=True)
    assert zk_client.get(zk_prefix + "/x")[0] == b"1"
