// FAVOR+ attention on the CPU (issue 4): not implemented yet.
#pragma once
