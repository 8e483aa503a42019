#!/usr/bin/env ruby
# frozen_string_literal: true
#
# A tiny stand-in for Chef, enough to test the neti cookbook without Chef: an attribute store
# that evaluates attributes/default.rb (auto-vivifying `default[...][...] = v`, merged with
# override attributes from a JSON file like a role would set), the cookbook's own library,
# and ERB rendering with the variables the recipes pass.
#
#   ruby render.rb COOKBOOK attrs [OVERRIDES.json]             -> merged node['neti'] as JSON
#   ruby render.rb COOKBOOK template NAME [OVERRIDES.json]     -> rendered template
#   ruby render.rb COOKBOOK call FUNCTION [OVERRIDES.json] [ARGS...] -> helper result as JSON
require 'erb'
require 'json'

# Writes auto-vivify, keys are strings (Chef's attribute keys are), like Chef's VividMash.
class AttrStore < Hash
  def initialize
    super { |h, k| h[k] = AttrStore.new }
  end

  def [](key)
    super(key.to_s)
  end

  def []=(key, value)
    super(key.to_s, value)
  end
end

# The node: default and override levels; reads see the deep merge, as plain (non-vivifying)
# hashes, so a missing key reads as nil as in Chef.
class FakeNode
  attr_reader :default, :override

  def initialize
    @default = AttrStore.new
    @override = AttrStore.new
  end

  def self.merge(low, high)
    return deep_plain(high) unless low.is_a?(Hash) && high.is_a?(Hash)

    out = deep_plain(low)
    high.each { |k, v| out[k.to_s] = out.key?(k.to_s) ? merge(out[k.to_s], v) : deep_plain(v) }
    out
  end

  def self.deep_plain(value)
    case value
    when Hash then value.each_with_object({}) { |(k, v), h| h[k.to_s] = deep_plain(v) }
    when Array then value.map { |v| deep_plain(v) }
    else value
    end
  end

  def merged
    FakeNode.merge(@default, @override)
  end

  def [](key)
    merged[key.to_s]
  end
end

cookbook, command, name, overrides, *args = ARGV
abort 'usage: render.rb COOKBOOK attrs|template|call [NAME] [OVERRIDES.json]' unless cookbook && command
overrides = name if command == 'attrs'

node = FakeNode.new
node.instance_eval(File.read(File.join(cookbook, 'attributes', 'default.rb')), 'attributes/default.rb')
if overrides && !overrides.empty?
  JSON.parse(File.read(overrides)).each { |k, v| node.override[k] = v }
end
Dir.glob(File.join(cookbook, 'libraries', '*.rb')).sort.each { |lib| require File.expand_path(lib) }

# The variables each template gets: exactly the expressions in recipes/default.rb.
VARIABLES = {
  'neti.yml.erb' => lambda { |n|
    { config: NetiCookbook.config_hash(n), config_path: n['neti']['config_path'] }
  },
  'neti.service.erb' => ->(n) { NetiCookbook.service_variables(n) },
}.freeze

# A template's view: instance variables from the recipe's `variables`, like Chef's context.
class TemplateContext
  def initialize(vars)
    vars.each { |k, v| instance_variable_set("@#{k}", v) }
  end

  def render(text, path)
    erb = ERB.new(text, trim_mode: '-')
    erb.filename = path
    erb.result(binding)
  end
end

begin
  case command
  when 'attrs'
    puts JSON.pretty_generate(node['neti'])
  when 'template'
    path = File.join(cookbook, 'templates', 'default', name)
    vars = VARIABLES.fetch(name) { abort "render.rb: no variables known for #{name}" }.call(node)
    $stdout.write TemplateContext.new(vars).render(File.read(path), path)
  when 'call'
    result = case name
             when 'overlay_ip' then NetiCookbook.overlay_ip(*args)
             when 'installed_version' then NetiCookbook.installed_version(*args)
             when 'wireguard_go?' then NetiCookbook.wireguard_go?(node, args.empty? ? nil : args[0] == 'true')
             else NetiCookbook.public_send(name, node)
             end
    puts JSON.generate(result)
  else
    abort "render.rb: unknown command #{command}"
  end
rescue StandardError => e
  warn "render.rb: #{e.class}: #{e.message}"
  exit 1
end
