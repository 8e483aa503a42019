#
# Cookbook:: neti
# Recipe:: default
#
# Installs the agent at a pinned version, renders /etc/neti/neti.yml from
# node['neti']['config'], raises the conntrack limits BEFORE the agent first starts, runs the
# agent under systemd, and publishes this host's overlay IP as node['neti']['overlay_ip'].
#
# Why conntrack first: DNAT needs connection tracking. The original Neti enabled it on a busy
# memcached host with the kernel's default table (65536 entries), which filled in seconds
# and dropped new connections. The module is loaded and sized here, before any rule exists.

neti = node['neti']
conf = neti['config']

if NetiCookbook.plain(conf['zk_hosts']).empty?
  raise "neti: set node['neti']['config']['zk_hosts'] (network label => ['host:port', ...])"
end

package neti['packages']

# WireGuard in userspace where the kernel has no module (docs/dataplane.md, "Encryption").
package 'wireguard-go' do
  only_if { NetiCookbook.wireguard_go?(node) }
end

# --- the package, in its own venv, at the pinned version ---
execute 'neti venv' do
  command ['python3', '-m', 'venv', neti['venv']]
  creates "#{neti['venv']}/bin/pip"
end

execute 'neti pip install' do
  command NetiCookbook.pip_install_command(node)
  not_if { NetiCookbook.installed_version(neti['venv'], neti['package_name']) == neti['version'] }
  notifies :restart, 'service[neti]', :delayed
end

link neti['bin'] do
  to "#{neti['venv']}/bin/neti"
end

# --- config, checked by the agent itself before it replaces the live file ---
directory ::File.dirname(neti['config_path']) do
  owner 'root'
  group 'root'
  mode '0755'
end

# --- ZooKeeper credentials (docs/security.md), before the config that names them ---
# Written only for the attributes set (PEM text from a vault or encrypted data bag); a path
# in zk_tls/zk_auth whose content is not given is left to the operator's own tooling.
NetiCookbook.credential_files(node).each do |f|
  directory ::File.dirname(f['path']) do
    owner 'root'
    group 'root'
    mode '0755'
    recursive true
  end

  file f['path'] do
    content f['content']
    owner 'root'
    group 'root'
    mode f['mode']
    sensitive true
    # The agent loads its certificate and key when it connects: a new one needs a restart.
    notifies :restart, 'service[neti]', :delayed
  end
end

template neti['config_path'] do
  source 'neti.yml.erb'
  owner 'root'
  group 'root'
  mode '0640'
  variables(config: NetiCookbook.config_hash(node), config_path: neti['config_path'])
  verify do |path|
    out, status = Open3.capture2e(neti['bin'], 'config', 'check', '-c', path)
    Chef::Log.error("neti config check #{path}:\n#{out}") unless status.success?
    status.success?
  end
  # A reload (SIGHUP) applies the new config without leaving the fleet; a restart would make
  # every peer drop this host for a moment.
  notifies :reload, 'service[neti]', :delayed
end

# --- conntrack: loaded and sized before the service first starts ---
hashsize = conf['conntrack']['hashsize'].to_i
conntrack_max = conf['conntrack']['max'].to_i

# At boot the module is loaded with this hash size (modules-load.d, written by
# kernel_module :install below, loads it before systemd-sysctl applies nf_conntrack_max).
file '/etc/modprobe.d/neti-nf_conntrack.conf' do
  content "# Managed by Chef (neti)\noptions nf_conntrack hashsize=#{hashsize}\n"
  mode '0644'
  only_if { hashsize > 0 }
end

neti['kernel_modules'].each do |mod|
  kernel_module mod do
    action :install # load now and at every boot
  end
end

# The module may already be loaded (with the default size): resize it in place.
ruby_block 'neti nf_conntrack hashsize' do
  block do
    ::File.write('/sys/module/nf_conntrack/parameters/hashsize', hashsize.to_s)
  end
  only_if do
    path = '/sys/module/nf_conntrack/parameters/hashsize'
    hashsize > 0 && ::File.exist?(path) && ::File.read(path).to_i < hashsize
  end
end

sysctl 'net.netfilter.nf_conntrack_max' do
  value conntrack_max
  only_if { conntrack_max > 0 }
end

# --- the service ---
execute 'neti systemctl daemon-reload' do
  command %w(systemctl daemon-reload)
  action :nothing
end

template '/etc/systemd/system/neti.service' do
  source 'neti.service.erb'
  owner 'root'
  group 'root'
  mode '0644'
  variables(NetiCookbook.service_variables(node))
  notifies :run, 'execute[neti systemctl daemon-reload]', :immediately
  notifies :restart, 'service[neti]', :delayed
end

service 'neti' do
  supports status: true, restart: true, reload: true
  action [:enable, :start]
end

# --- this host's overlay IP, for other recipes (e.g. to write into application configs) ---
# `neti overlay-ip` returns this host's claim (claiming one on first use), so the value is
# the same on every run. Read it as node['neti']['overlay_ip'] in recipes that run later,
# or lazily: lazy { node['neti']['overlay_ip'] }.
ruby_block 'neti overlay ip' do
  block do
    node.default['neti']['overlay_ip'] = NetiCookbook.overlay_ip(neti['bin'], neti['config_path'])
    Chef::Log.info("neti: overlay IP #{node['neti']['overlay_ip']}")
  end
end
