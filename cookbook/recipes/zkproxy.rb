#
# Cookbook:: neti
# Recipe:: zkproxy
#
# Makes this host a ZooKeeper proxy: one ensemble member (node['neti']['zkproxy']['target'],
# host:port) reachable on node['neti']['zkproxy']['listen_port'] from networks that cannot
# route to the ensemble privately, for clients in node['neti']['zkproxy']['allow'] (CIDRs;
# required: the proxy forwards no one else). `neti zkproxy apply` is idempotent, so it runs
# on every converge and repairs drift.

include_recipe 'neti::default'

execute 'neti zkproxy apply' do
  command NetiCookbook.zkproxy_command(node) # argv, validated: no shell
end
