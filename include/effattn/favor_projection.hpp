// favor_projection (issue 4): not implemented yet.
#pragma once
