#
# Cookbook:: neti
# Library:: helpers
#
# Plain Ruby (no Chef API) so tests/cookbook/render.rb can load it outside Chef: the recipes
# and the test harness build template variables and commands with the same code.
#
require 'ipaddr'
require 'json'
require 'open3'

module NetiCookbook
  IDENTITY_KEYS = {
    'ec2' => %w(source endpoint timeout retries classic_network),
    'static' => %w(source instance_id private_ip public_ip network),
  }.freeze

  # Node attributes (Mash, ImmutableMash, ImmutableArray) as plain Hash/Array/scalars.
  def self.plain(value)
    case value
    when Hash then value.each_with_object({}) { |(k, v), h| h[k.to_s] = plain(v) }
    when Array then value.map { |v| plain(v) }
    else value
    end
  end

  # The neti.yml content as an ordered Hash: node['neti']['config'], with only the identity
  # keys of the chosen source (Chef cannot delete the other source's default keys).
  def self.config_hash(node)
    config = plain(node['neti']['config'])
    identity = config['identity'] || {}
    source = (identity['source'] || 'ec2').to_s
    keys = IDENTITY_KEYS.fetch(source) do
      raise ArgumentError, "node['neti']['config']['identity']['source'] must be " \
                           "'ec2' or 'static', not #{source.inspect}"
    end
    config['identity'] = identity.select { |k, v| keys.include?(k) && !v.nil? }
    config
  end

  # Whether to install wireguard-go: node['neti']['wireguard_go'] when set; otherwise when
  # encryption is on, may use userspace, and the kernel has no WireGuard module.
  def self.wireguard_go?(node, module_present = nil)
    forced = node['neti']['wireguard_go']
    return forced == true unless forced.nil?

    enc = plain(node['neti']['config']['encryption']) || {}
    return false unless enc['mode'].to_s == 'wireguard' && enc['implementation'].to_s != 'kernel'

    present = module_present.nil? ? wireguard_module? : module_present
    !present
  end

  # The kernel has the WireGuard module (loaded, or installed: modinfo finds it).
  def self.wireguard_module?
    return true if File.directory?('/sys/module/wireguard')

    system('modinfo', 'wireguard', out: File::NULL, err: File::NULL) ? true : false
  end

  # One YAML value. JSON is YAML: quoting and escaping come for free, and "true" stays a string.
  def self.yaml_value(value)
    JSON.generate(value)
  end

  def self.service_variables(node)
    { bin: node['neti']['bin'], config_path: node['neti']['config_path'] }
  end

  def self.pip_install_command(node)
    venv = node['neti']['venv']
    cmd = ["#{venv}/bin/pip", 'install', '--quiet', '--disable-pip-version-check']
    cmd += ['--index-url', node['neti']['pip_index_url']] if node['neti']['pip_index_url']
    cmd << "#{node['neti']['package_name']}==#{node['neti']['version']}"
    cmd
  end

  # The version installed in the venv (from its dist-info directory), or nil.
  def self.installed_version(venv, package)
    name = package.downcase.tr('-', '_')
    Dir.glob("#{venv}/lib/python3*/site-packages/*.dist-info").each do |dir|
      base = File.basename(dir, '.dist-info')
      pkg, _, version = base.rpartition('-')
      return version if pkg.downcase.tr('-', '_') == name
    end
    nil
  end

  # This host's overlay IP from `neti overlay-ip` (which claims one if the host has none).
  # argv, never a shell.
  def self.overlay_ip(bin, config_path)
    out, err, status = Open3.capture3(bin, 'overlay-ip', '-c', config_path)
    raise "#{bin} overlay-ip -c #{config_path} failed (#{status.exitstatus}): #{err.strip}" unless status.success?
    ip = out.strip
    begin
      addr = IPAddr.new(ip)
    rescue IPAddr::Error
      addr = nil
    end
    raise "#{bin} overlay-ip printed #{ip[0, 60].inspect}, not an IPv4 address" unless addr&.ipv4? && !ip.include?('/')
    ip
  end

  PEM_BLOCK = /\A-----BEGIN ([A-Z0-9 ]+)-----\r?\n[A-Za-z0-9+\/=\r\n]+?-----END \1-----\s*/.freeze
  CREDENTIALS = [
    # attribute, the config key naming its path, mode, the PEM labels it may hold
    ['ca_pem', %w(zk_tls ca), '0644', ['CERTIFICATE']],
    ['cert_pem', %w(zk_tls cert), '0644', ['CERTIFICATE']],
    ['key_pem', %w(zk_tls key), '0600', ['PRIVATE KEY', 'EC PRIVATE KEY', 'RSA PRIVATE KEY']],
    ['digest', %w(zk_auth credentials_file), '0600', nil],
  ].freeze

  # The credential files to write: [{path, content, mode, attribute}], each path taken from
  # the config key it serves (one source of truth). Content that is not what the key needs
  # (a certificate as the key, an encrypted key, junk) fails the run naming the attribute.
  def self.credential_files(node)
    creds = plain(node['neti']['credentials']) || {}
    config = plain(node['neti']['config'])
    CREDENTIALS.filter_map do |attr, (section, key), mode, labels|
      content = creds[attr]
      next if content.nil?

      name = "node['neti']['credentials']['#{attr}']"
      path = (config[section] || {})[key] if config[section].is_a?(Hash)
      unless path.is_a?(String) && path.start_with?('/') && !path.include?("\0")
        raise ArgumentError, "#{name} is set, but node['neti']['config']['#{section}']['#{key}'] " \
                             'names no absolute path to write it to'
      end
      raise ArgumentError, "#{name} must be a string" unless content.is_a?(String)

      content = "#{content}\n" unless content.end_with?("\n")
      if labels
        found = pem_labels(content)
        unless found && !found.empty? && found.all? { |l| labels.include?(l) } &&
               (attr == 'ca_pem' || found.size == 1)
          want = attr == 'ca_pem' ? 'PEM certificates' : "one PEM #{labels.first}"
          got = found.nil? || found.empty? ? 'not PEM' : found.uniq.join(', ')
          raise ArgumentError, "#{name} must be #{want} (got #{got})"
        end
      else
        lines = content.split("\n")
        unless !lines.empty? && lines.all? { |l| l.match?(/\A[^:\s]{1,256}:[^\r\n]{1,1024}\z/) }
          raise ArgumentError, "#{name} must be 'user:password' lines"
        end
      end
      { 'path' => path, 'content' => content, 'mode' => mode, 'attribute' => attr }
    end
  end

  # The labels of the PEM blocks ``text`` consists of (nothing else around them), or nil.
  def self.pem_labels(text)
    rest = text.strip
    found = []
    until rest.empty?
      m = rest.match(PEM_BLOCK)
      return nil unless m

      found << m[1]
      rest = m.post_match
    end
    found
  end

  def self.zkproxy_command(node)
    target = node['neti']['zkproxy']['target'].to_s
    port = node['neti']['zkproxy']['listen_port']
    unless target =~ /\A(\[[0-9A-Fa-f:]+\]|[A-Za-z0-9_.-]+):(\d{1,5})\z/ && Regexp.last_match(2).to_i.between?(1, 65_535)
      raise ArgumentError, "node['neti']['zkproxy']['target'] must be host:port of this " \
                           "proxy's ZooKeeper ensemble member, not #{target.inspect}"
    end
    unless port.to_s =~ /\A\d{1,5}\z/ && port.to_i.between?(1, 65_535)
      raise ArgumentError, "node['neti']['zkproxy']['listen_port'] must be a port, not #{port.inspect}"
    end
    allow = node['neti']['zkproxy']['allow']
    # Closed by default: no allowed source fails the run here, as `neti zkproxy apply` would.
    unless allow.is_a?(Array) && !allow.empty? &&
           allow.all? { |a| a.is_a?(String) && a =~ %r{\A\d{1,3}(\.\d{1,3}){3}(/\d{1,2})?\z} }
      raise ArgumentError, "node['neti']['zkproxy']['allow'] must list the networks (CIDR) " \
                           "whose clients may use this proxy, not #{allow.inspect}"
    end
    [node['neti']['bin'], 'zkproxy', 'apply', '-c', node['neti']['config_path'],
     '--target', target, '--listen-port', port.to_s] + allow.flat_map { |a| ['--allow', a] }
  end
end
