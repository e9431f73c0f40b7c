// Nyström attention on the CPU (issue 3): not implemented yet.
#pragma once
