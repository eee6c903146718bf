-- wrk script for the "skewed" load: one connection per request; 1 request in 20 asks the
-- server to burn 5 ms of CPU on its event loop (/burn?ms=5), the other 19 ask for "/".
-- The pattern is deterministic per wrk thread (every 20th request), so runs are comparable.
-- done() is the one from report.lua, loaded from this script's own directory.

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "report.lua")

local n = 0
local cheap = wrk.format("GET", "/", { ["Connection"] = "close" })
local burn = wrk.format("GET", "/burn?ms=5", { ["Connection"] = "close" })

function request()
   n = n + 1
   if n % 20 == 0 then
      return burn
   end
   return cheap
end
