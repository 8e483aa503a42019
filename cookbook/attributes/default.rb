#
# Cookbook:: neti
# Attributes:: default
#
# node['neti']['config'] is neti.yml, key for key: every key of the agent's config
# (neti/config.py, documented in docs/configuration.md) with the agent's own default, so a
# host configured only by these attributes behaves exactly like one with a hand-written file.
# tests/cookbook checks both (same keys, same defaults).
#
# Chef merges hashes across precedence levels and cannot delete a default key, so:
#   - the identity keys of both sources are here; the template renders only those of
#     node['neti']['config']['identity']['source'];
#   - nil renders as null, which the agent reads as "not set" for the optional keys.

# --- installation ---
default['neti']['version'] = '2.0.0'                 # pip package version, pinned
default['neti']['package_name'] = 'neti'
default['neti']['pip_index_url'] = nil               # e.g. an internal mirror
default['neti']['venv'] = '/opt/neti'                # the package lives in its own venv
default['neti']['bin'] = '/usr/local/bin/neti'       # symlink to the venv's entry point
default['neti']['config_path'] = '/etc/neti/neti.yml'
default['neti']['packages'] = %w(iptables ipset nftables conntrack python3 python3-venv wireguard-tools)
# wireguard-go, WireGuard in userspace: nil installs it where encryption is on and the kernel
# has no WireGuard module (implementation auto or userspace); true/false: always/never.
default['neti']['wireguard_go'] = nil
# Loaded before the agent starts (and at boot via /etc/modules-load.d): the unit drops
# CAP_SYS_MODULE, and nf_conntrack must exist so its limits can be raised first.
default['neti']['kernel_modules'] = %w(nf_conntrack)

# --- the zkproxy recipe (one ZooKeeper ensemble member reachable from other networks) ---
default['neti']['zkproxy']['target'] = nil           # host:port of this proxy's ensemble member
default['neti']['zkproxy']['listen_port'] = 2181
default['neti']['zkproxy']['allow'] = []             # required: CIDRs of the clients it serves

# --- neti.yml: keys of the original Neti ---
default['neti']['config']['zk_hosts'] = {}           # required: { 'network' => ['host:port', ...] }
default['neti']['config']['zk_prefix'] = '/neti'
default['neti']['config']['overlay_subnet'] = '192.168.0.0/18'
default['neti']['config']['open_ports'] = []
default['neti']['config']['reject_all'] = false
default['neti']['config']['ssh_whitelist'] = []
default['neti']['config']['nat_overrides'] = {}
default['neti']['config']['table_files_path'] = nil # accepted for compatibility, unused
default['neti']['config']['log_file'] = nil
default['neti']['config']['zk_iptoid_node'] = 'ip-to-id'
default['neti']['config']['zk_idtoip_node'] = 'id-to-ip'
default['neti']['config']['zk_ip_map_node'] = 'ip-map'
default['neti']['config']['zk_max_change_threshold_path'] = 'maxchange'
default['neti']['config']['zk_update_interval_path'] = 'interval'
default['neti']['config']['aws_key'] = nil           # ignored: instance profile credentials
default['neti']['config']['aws_secret_key'] = nil
default['neti']['config']['overlay_ip_cache_file_path'] = nil # unused: see node['neti']['overlay_ip']

# --- neti.yml: new keys ---
default['neti']['config']['zk_members_node'] = 'members'
default['neti']['config']['zk_session_timeout'] = 10.0
default['neti']['config']['watch_delay_min'] = 0.05
default['neti']['config']['watch_delay_max'] = 0.3   # only batches bursts: see docs/configuration.md
default['neti']['config']['resync_interval'] = 60.0
default['neti']['config']['state_dir'] = '/var/lib/neti'
default['neti']['config']['runtime_dir'] = '/run/neti' # tmpfs: status hears the agent when state_dir is full
default['neti']['config']['identity']['source'] = 'ec2'
default['neti']['config']['identity']['endpoint'] = 'http://169.254.169.254'
default['neti']['config']['identity']['timeout'] = 2.0
default['neti']['config']['identity']['retries'] = 3
default['neti']['config']['identity']['classic_network'] = 'ec2-classic'
default['neti']['config']['identity']['instance_id'] = nil # source 'static' only
default['neti']['config']['identity']['private_ip'] = nil
default['neti']['config']['identity']['public_ip'] = nil
default['neti']['config']['identity']['network'] = nil
default['neti']['config']['legacy_networks'] = { '0' => 'ec2', '1' => 'vpc' }
default['neti']['config']['publish_legacy'] = false
default['neti']['config']['backend'] = 'auto'
default['neti']['config']['allow_verdict'] = 'accept'
default['neti']['config']['forward'] = false
default['neti']['config']['chain_position'] = 'keep' # 'first': Neti's jumps back on top each resync
default['neti']['config']['conntrack']['max'] = 262_144     # also applied before the first start
default['neti']['config']['conntrack']['hashsize'] = 65_536
default['neti']['config']['metrics']['enabled'] = false
default['neti']['config']['metrics']['listen'] = '127.0.0.1'
default['neti']['config']['metrics']['port'] = 9437
default['neti']['config']['log_level'] = 'INFO'
default['neti']['config']['max_change_default'] = 20
# The mass-removal guard (docs/operations.md); nil: derived from zk_session_timeout.
default['neti']['config']['guard_window'] = 60.0
default['neti']['config']['guard_fraction'] = 0.1
default['neti']['config']['guard_grace'] = nil
default['neti']['config']['guard_settle'] = nil
default['neti']['config']['tag_instance'] = 'auto'
# Trust (docs/security.md). nil: the original's open registry. A secured host sets, e.g.
#   zk_tls: { 'ca' => '/etc/neti/zk-ca.pem', 'cert' => '/etc/neti/host.pem',
#             'key' => '/etc/neti/host.key' }
#   zk_acl: { 'operators' => ['x509:CN=neti-operator'] }
# and the files come from node['neti']['credentials'] below (or are put there by other means).
default['neti']['config']['zk_tls'] = nil
default['neti']['config']['zk_auth'] = nil             # { 'scheme' => 'digest', 'credentials_file' => path }
default['neti']['config']['zk_acl'] = nil
default['neti']['config']['read_legacy'] = true        # false once no original agent is left
default['neti']['config']['require_signed_members'] = nil # nil: on with zk_tls.cert
default['neti']['config']['v1_members'] = 'read'      # 'publish' during an upgrade from v1 agents; 'off' after
# Encryption between members (docs/dataplane.md, "Encryption: WireGuard tunnels"). 'wireguard'
# needs zk_tls with cert and key: each host's WireGuard key travels in its signed record.
default['neti']['config']['encryption']['mode'] = 'off'
default['neti']['config']['encryption']['scope'] = 'cross-network' # or 'all'; the same fleet-wide
default['neti']['config']['encryption']['interface'] = 'neti0'
default['neti']['config']['encryption']['listen_port'] = 51_820
default['neti']['config']['encryption']['implementation'] = 'auto' # 'kernel', 'userspace'

# --- credential files (written before neti.yml, owner root; the key 0600) ---
# PEM text for the files zk_tls names, and the digest lines for zk_auth's credentials_file.
# Set them from a vault or an encrypted data bag in a wrapper cookbook (node.run_state is not
# an attribute; use override attributes there, never a role in plain text). nil: the recipe
# leaves that file alone (the operator's own tooling installs it; neti.yml only names it).
default['neti']['credentials']['ca_pem'] = nil         # -> zk_tls.ca (the fleet's CA bundle)
default['neti']['credentials']['cert_pem'] = nil       # -> zk_tls.cert (CN = instance ID)
default['neti']['credentials']['key_pem'] = nil        # -> zk_tls.key (unencrypted PEM)
default['neti']['credentials']['digest'] = nil         # -> zk_auth.credentials_file
