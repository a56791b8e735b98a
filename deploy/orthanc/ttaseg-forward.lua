-- Forwards the image series of every stable study to ttaseg over STOW-RS, through the DICOMweb server
-- entry "ttaseg" of the Orthanc configuration (its URL and the client's bearer token are set there).
-- Series of results (SEG, SR, ...) are not forwarded, so results pushed back by ttaseg do not loop.

local RESULT_MODALITIES = { SEG = true, SR = true, RTSTRUCT = true, PR = true, KO = true, DOC = true }

function OnStableStudy(studyId, tags, metadata)
  local images = {}
  for _, series in ipairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))) do
    if not RESULT_MODALITIES[series['MainDicomTags']['Modality'] or ''] then
      table.insert(images, series['ID'])
    end
  end
  if #images > 0 then
    RestApiPost('/dicom-web/servers/ttaseg/stow', DumpJson({ Resources = images, Synchronous = false }, true))
    print('ttaseg: forwarded ' .. #images .. ' series of study ' .. studyId)
  end
end
