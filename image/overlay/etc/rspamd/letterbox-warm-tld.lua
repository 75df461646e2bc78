-- Letterbox (issue 16): compile rspamd's public-suffix list into its Hyperscan cache before rspamd
-- starts (run by rspamd.service's ExecStartPre, see /etc/systemd/system/rspamd.service.d/letterbox.conf).
--
-- rspamd's main process compiles the list (the image's letterbox-tld.dat: about 2700 patterns, a 10 MB
-- database; Debian's full list: 9600 patterns, 43 MB) the first time it starts and keeps the compiler's
-- heap afterwards: measured on amd64 with the full list, 250 MB PSS for rspamd + Redis after that first
-- start, against about 100 MB on every later start, which reads the compiled list back from its cache
-- (hs_cache_dir, rspamd's DBDIR). Compiling it here, in a process that then exits, makes the
-- first start like the later ones. When the cache is there already (every boot but the first, until an
-- update brings a new list or a new Hyperscan) this only reads it back and exits.
--
-- The cache file is named by a hash of the patterns, their flags and the CPU's features, so rspamd
-- finds exactly what this compiled. Where rspamd has no Hyperscan (Hyperscan is x86-only; rspamd also
-- goes without it on a CPU without SSSE3) the list is an Aho-Corasick automaton built in memory at each
-- start, and this does nothing useful.
--
-- The default TLD_FILE must be the url_tld of local.d/options.inc: another list would be another cache
-- file, and rspamd would compile its own list itself.
--
-- Usage: rspamadm lua -b -s letterbox-warm-tld.lua [-a TLD_FILE -a CACHE_DIR]  (stdin: /dev/null)
local rspamd_util = require "rspamd_util"

local args = arg or {}
local tld_file = args[1] or "/etc/rspamd/letterbox-tld.dat"
local cache_dir = args[2] or "/var/lib/rspamd/"

local cfg = rspamd_util.config_from_ucl({
  options = {
    url_tld = tld_file,
    hs_cache_dir = cache_dir,
  },
}, "INIT_URL,INIT_LIBS")

if not cfg then
  io.stderr:write("letterbox-warm-tld: could not load the public-suffix list " .. tld_file .. "\n")
  os.exit(1)
end
