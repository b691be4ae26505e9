-- Argo CD health of a sparsemoe.io InferenceDeployment, read from the conditions the operator
-- writes (Ready, Progressing, Degraded; it also writes kstatus's Reconciling and Stalled, which
-- follow Progressing). Argo CD runs it with `obj`, the object.
local hs = { status = "Progressing", message = "waiting for the sparsemoe operator" }
local status = obj.status
if status == nil then
  return hs
end
local generation = obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= generation then
  hs.message = "waiting for the sparsemoe operator to observe generation " .. tostring(generation)
  return hs
end
local conditions = {}
if status.conditions ~= nil then
  for _, c in ipairs(status.conditions) do
    conditions[c.type] = c
  end
end
local function said(c)
  if c.message ~= nil and c.message ~= "" then
    return c.reason .. ": " .. c.message
  end
  return c.reason
end
local degraded = conditions["Degraded"]
local ready = conditions["Ready"]
local progressing = conditions["Progressing"]
-- A problem that blocks the rollout (Progressing is then False, Stalled), fails pods or finds
-- them no node, or leaves replicas no variant has room for: waiting will not fix it.
if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = said(degraded)
  return hs
end
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = said(ready)
  return hs
end
-- Scaled to zero and settled: the spec is realised, as for a Deployment of 0 replicas.
if ready ~= nil and ready.reason == "NoReplicas" and progressing ~= nil and progressing.status == "False" then
  hs.status = "Healthy"
  hs.message = said(ready)
  return hs
end
if progressing ~= nil and progressing.status == "True" then
  hs.message = said(progressing)
elseif ready ~= nil then
  hs.message = said(ready)
end
return hs
